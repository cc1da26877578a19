//! Small, fast, non-cryptographic randomness and hashing for the balancers: a wyrand generator per
//! balancer (one per group per shard, so no sharing, no atomics) and 64-bit mixers for seeding and
//! for rendezvous hashing.

use std::cell::Cell;
use std::net::IpAddr;

/// wyrand (Wang Yi): one add and one 64×64→128 multiply per output; passes BigCrush / PractRand.
pub(crate) struct Rng {
    state: Cell<u64>,
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng {
            state: Cell::new(mix64(seed)),
        }
    }

    pub(crate) fn next_u64(&self) -> u64 {
        let s = self.state.get().wrapping_add(0xa076_1d64_78bd_642f);
        self.state.set(s);
        mum(s, s ^ 0xe703_7ed1_a0b4_28db)
    }

    /// Uniform in `0..n` (`n > 0`) by Lemire's multiply-shift; the bias (≤ n / 2⁶⁴) is irrelevant here.
    pub(crate) fn below(&self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    pub(crate) fn coin(&self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// 64×64→128 multiply folded to 64 bits (the wyhash primitive).
fn mum(a: u64, b: u64) -> u64 {
    let r = a as u128 * b as u128;
    (r as u64) ^ ((r >> 64) as u64)
}

/// The murmur3 / splitmix64 finalizer: a bijection with full avalanche.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hash of two words (order matters), well mixed.
pub(crate) fn hash2(a: u64, b: u64) -> u64 {
    mix64(mum(a ^ 0x2d35_8dcc_aa6c_78a5, b ^ 0x8bb8_4b93_962e_acc9) ^ a.rotate_left(32))
}

/// FNV-1a over bytes, folded through `mix64` (seeding only: group names).
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// A client IP as a 64-bit key. IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack listener
/// reports for IPv4 clients) hashes like the plain IPv4 address, so a client keeps its upstream
/// whichever listener it came through.
pub(crate) fn ip_key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(a) => hash2(u32::from(a) as u64, 4),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            hash2((v >> 64) as u64, hash2(v as u64, 6))
        }
    }
}

/// `h` mapped into the open interval (0, 1): the top 52 bits plus one half, so neither 0 nor 1
/// (1 − 2⁻⁵³ is the largest value, exactly representable).
pub(crate) fn unit_open(h: u64) -> f64 {
    ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}
