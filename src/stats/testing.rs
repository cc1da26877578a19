//! Hand-built configurations for the stats, metrics and admin tests (the loader is elsewhere).

use std::time::Duration;

use crate::config::*;

fn upstream(name: &str, port: u16) -> Upstream {
    Upstream {
        name: name.to_string(),
        url: format!("http://127.0.0.1:{port}/v1"),
        scheme: Scheme::Http,
        host: "127.0.0.1".into(),
        port,
        host_header: format!("127.0.0.1:{port}"),
        base_path: "/v1".into(),
        auth: Auth::None,
        headers: Vec::new(),
        breaker: Breaker {
            enabled: true,
            threshold: 0.5,
            cooldown: Duration::from_secs(30),
            max_requests: 3,
            interval: Duration::from_secs(10),
            min_requests: 10,
            consecutive_failures: 5,
            count_429: true,
        },
        ratelimit: None,
        replace_path: None,
        tls: None,
    }
}

fn group(name: &str, members: &[usize]) -> Group {
    Group {
        name: name.to_string(),
        members: members
            .iter()
            .map(|&upstream| Member {
                upstream,
                weight: 1,
            })
            .collect(),
        strategy: Strategy::RoundRobin,
        client: HttpClient {
            agent: "LLMProxy/1.0".into(),
            tcp_keepalive: Some(Duration::from_secs(60)),
            stream: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            first_byte_timeout: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle: 64,
            retry: None,
            proxy: None,
        },
    }
}

/// Two forwards, three upstreams, groups `main` = {a, b} and `backup` = {b, c}.
pub(crate) fn test_config() -> Config {
    let forward = |name: &str, port: u16| Forward {
        name: name.to_string(),
        listen: ([127, 0, 0, 1], port).into(),
        default_group: 0,
        ratelimit: None,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        routes: Vec::new(),
        max_body_bytes: 64 << 20,
        max_head_bytes: 64 << 10,
        tls: None,
    };
    Config {
        forwards: vec![forward("chat", 3000), forward("embed", 3001)],
        admin: Admin {
            listen: ([127, 0, 0, 1], 9000).into(),
            header_timeout: Duration::from_secs(10),
        },
        upstreams: vec![
            upstream("openai-a", 8001),
            upstream("openai-b", 8002),
            upstream("local-c", 8003),
        ],
        groups: vec![group("main", &[0, 1]), group("backup", &[1, 2])],
        runtime: Runtime {
            shards: 2,
            driver: Driver::Auto,
            tick: Duration::from_millis(20),
            shutdown_timeout: Duration::from_secs(30),
            dns_refresh: Duration::from_secs(30),
        },
        dialect: Dialect::LlmProxy,
        warnings: Vec::new(),
    }
}
