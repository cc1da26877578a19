//! What an operator meets in production that the config reference is silent on: the open-file
//! limit a service manager hands us, log levels spelled the way other tools spell them.

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The soft open-file limit the proxy is started with (a typical distribution default is 1024;
/// lower keeps the test small).
const LOW_SOFT_LIMIT: u64 = 256;
/// Concurrent client connections, each with a request in flight at the upstream: about 2
/// descriptors per client, far more than `LOW_SOFT_LIMIT`.
const CLIENTS: usize = 400;

fn hard_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max
}

#[test]
fn a_low_soft_open_file_limit_is_raised_so_many_connections_are_served() {
    let hard = hard_nofile_limit();
    let needed = (3 * CLIENTS) as u64 + 64;
    if hard < needed {
        eprintln!("skipped: the hard open-file limit ({hard}) is below {needed}");
        return;
    }
    let mock = Mock::start(&[]);
    let proxy = Proxy::start_with(
        &config(mock.port(), "", "", ""),
        &["--shards", "1"],
        |cmd| {
            // SAFETY: setrlimit in the child between fork and exec (async-signal-safe).
            unsafe {
                cmd.pre_exec(|| {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                    lim.rlim_cur = LOW_SOFT_LIMIT;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                    Ok(())
                });
            }
        },
    );
    // Every client opens a stream that lasts about 4 s, so all of them are open at once: a
    // proxy out of descriptors would accept the later ones only after earlier streams ended.
    let body = br#"{"model":"m","stream":true,"messages":[]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nx-mock-tokens: 5\r\nx-mock-gap-ms: 1000\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|_| {
            let mut c = Client::connect(proxy.port);
            c.send(req.as_bytes());
            c.stream.write_all(body).unwrap();
            c
        })
        .collect();
    let started = Instant::now();
    let mut answered = 0;
    let mut failures = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        // The head comes at once from the mock; 2.5 s of slack is well under the streams' 4 s.
        let left = Duration::from_millis(2500).saturating_sub(started.elapsed());
        c.set_read_timeout(left.max(Duration::from_millis(1)));
        match read_head(c) {
            Some(h) if h.starts_with("HTTP/1.1 200") => answered += 1,
            other => failures.push((i, other)),
        }
    }
    assert_eq!(
        answered,
        CLIENTS,
        "first failures (client, head): {:?}\n{}",
        &failures[..failures.len().min(5)],
        proxy.log_text()
    );
    drop(clients);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(soft >= needed, "soft limit still {soft}:\n{limits}");
    assert!(
        proxy.log_text().contains("open-file limit"),
        "{}",
        proxy.log_text()
    );
}

/// Reads up to the end of a response head (the body is left unread).
fn read_head(c: &mut Client) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(PROXY_BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn log_levels_are_checked_and_warning_means_warn() {
    // `warning` (syslog's and Python's spelling) used to be taken as a filter for a target named
    // "warning", which silenced every log line, errors included.
    let mock = Mock::start(&[]);
    let mut proxy = Proxy::start(
        &config(mock.port(), "", "", ""),
        &["--log-level", "warning"],
    );
    // A live stream keeps the drain going, so the second signal finds the process still up.
    let body = br#"{"model":"m","stream":true,"messages":[]}"#;
    let mut stream = Client::connect(proxy.port);
    stream.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nx-mock-tokens: 20\r\nx-mock-gap-ms: 500\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    stream.send(body);
    assert!(read_head(&mut stream).is_some_and(|h| h.starts_with("HTTP/1.1 200")));
    proxy.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    proxy.signal(libc::SIGINT);
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some());
    let log = proxy.log_text();
    assert!(
        log.contains("second signal"),
        "--log-level warning hid a warning: {log:?}"
    );
    assert!(
        !log.contains("llmproxyd started"),
        "info shown at warning: {log}"
    );

    for bad in ["verbose", "warnings", "loud"] {
        let (code, err) = run(&["-t", "--log-level", bad]);
        assert_eq!(code, 2, "--log-level {bad} was accepted: {err}");
        assert!(err.contains("--log-level"), "{err}");
    }
    for good in ["WARN", "off", "llmproxy=debug,warn"] {
        let (code, err) = run(&["-t", "--log-level", good]);
        assert_eq!(code, 0, "--log-level {good}: {err}");
    }
}
