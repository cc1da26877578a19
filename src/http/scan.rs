//! Byte search for heads and chunk-size lines (shard, sans-IO): eight bytes per step with
//! word-sized bit tricks (SWAR), not one byte per step, and no dependency.

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// Index of the first `needle` in `hay`.
#[inline]
pub fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    let pattern = LO.wrapping_mul(u64::from(needle));
    let mut chunks = hay.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes")) ^ pattern;
        // A byte of `w` is zero where `hay` holds `needle`. The lowest flagged byte is always a
        // real zero: borrows only run upwards, past the first zero byte.
        let zero = w.wrapping_sub(LO) & !w & HI;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|p| at + p)
}

/// Index of the first `\r\n\r\n` in `hay`.
pub fn find_crlfcrlf(hay: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 4 <= hay.len() {
        // Jump between '\n' bytes: heads are mostly text between line ends.
        let j = i + find_byte(&hay[i + 3..], b'\n')?; // candidate start
        if &hay[j..j + 4] == b"\r\n\r\n" {
            return Some(j);
        }
        i = j + 1;
    }
    None
}

/// Index of the first `\r\n` in `hay`.
pub fn find_crlf(hay: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = find_byte(&hay[from..], b'\n') {
        let lf = from + p;
        if lf > 0 && hay[lf - 1] == b'\r' {
            return Some(lf - 1);
        }
        from = lf + 1;
    }
    None
}

/// A `\n` not preceded by `\r`.
pub fn has_bare_lf(hay: &[u8]) -> bool {
    has_bare_lf_from(hay, 0)
}

/// A `\n` at or after `from` not preceded by `\r` (the byte before `from` counts as context).
pub fn has_bare_lf_from(hay: &[u8], mut from: usize) -> bool {
    while let Some(p) = hay.get(from..).and_then(|h| find_byte(h, b'\n')) {
        let lf = from + p;
        if lf == 0 || hay[lf - 1] != b'\r' {
            return true;
        }
        from = lf + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_crlfcrlf(h: &[u8]) -> Option<usize> {
        h.windows(4).position(|w| w == b"\r\n\r\n")
    }

    fn naive_bare_lf(h: &[u8]) -> bool {
        h.iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || h[i - 1] != b'\r'))
    }

    /// Every function against the obvious byte loop, on inputs built from the bytes that matter
    /// (and bytes one off from them, which trip naive bit tricks), at every length and offset.
    #[test]
    fn agrees_with_byte_loops() {
        let alphabet = [b'\r', b'\n', b'a', 0x0b, 0x09, 0x0c, 0x00, 0x8a, 0xff, 0x01];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..80 {
            for _ in 0..300 {
                let hay: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        alphabet[(x % alphabet.len() as u64) as usize]
                    })
                    .collect();
                for off in 0..hay.len().min(9) {
                    let h = &hay[off..];
                    for n in [b'\n', b'\r', 0u8, 0xff] {
                        assert_eq!(find_byte(h, n), h.iter().position(|&b| b == n), "{h:?} {n}");
                    }
                    assert_eq!(find_crlfcrlf(h), naive_crlfcrlf(h), "{h:?}");
                    assert_eq!(
                        find_crlf(h),
                        h.windows(2).position(|w| w == b"\r\n"),
                        "{h:?}"
                    );
                    assert_eq!(has_bare_lf(h), naive_bare_lf(h), "{h:?}");
                    for from in 0..=h.len() {
                        let naive = h
                            .iter()
                            .enumerate()
                            .skip(from)
                            .any(|(i, &b)| b == b'\n' && (i == 0 || h[i - 1] != b'\r'));
                        assert_eq!(has_bare_lf_from(h, from), naive, "{h:?} from {from}");
                    }
                }
            }
        }
    }

    #[test]
    fn examples() {
        assert_eq!(
            find_crlfcrlf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"),
            Some(23)
        );
        assert_eq!(find_crlfcrlf(b"\r\n\r"), None);
        assert_eq!(find_crlf(b"5;x\r\nhello"), Some(3));
        assert!(has_bare_lf(b"\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\r\nX: 1\n\r\n"));
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nX: 1\r\n\r\n"));
        // The CR before `from` still pairs with an LF at `from`.
        assert!(!has_bare_lf_from(b"X: 1\r\n", 5));
        assert!(has_bare_lf_from(b"X: 1\n\r\n", 3));
        assert!(!has_bare_lf_from(b"X: 1\n\r\n", 5));
        assert!(!has_bare_lf_from(b"ab", 9));
    }
}
