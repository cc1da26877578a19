//! TLS for the bench (startup and setup checks, never timed): a CA and an ECDSA P-256 leaf made
//! at run time with rcgen (nothing checked in), the files every server is given (the same
//! certificate and key for the TLS mock, llmproxyd, nginx and HAProxy), and the load
//! generator's rustls client config, which fixes what is negotiated so every server does the
//! same work: TLS 1.3 only, `TLS13_AES_256_GCM_SHA384` (the first choice of rustls's and
//! OpenSSL's default client lists), X25519, ALPN `http/1.1`, no session resumption (every new
//! connection is a full handshake).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// The name the generator connects to (sent as SNI, checked against the leaf's SANs).
pub const SERVER_NAME: &str = "localhost";

/// What is negotiated, as the servers are told to accept it (OpenSSL names).
pub const OPENSSL_SUITE: &str = "TLS_AES_256_GCM_SHA384";
pub const OPENSSL_GROUP: &str = "X25519";

/// One line for the report header.
pub fn describe() -> String {
    format!(
        "TLS: 1.3 only, {OPENSSL_SUITE}, {OPENSSL_GROUP}, ECDSA P-256 leaf (SHA-256) signed by an ECDSA P-256 CA made at start; \
         ALPN http/1.1; the generator (rustls 0.23, ring) offers only these and never resumes a session (every new connection is a full handshake)"
    )
}

/// The certificate files and the generator's client config.
pub struct TlsSetup {
    /// Leaf then CA, PEM (what `cert_file` / `ssl_certificate` get).
    pub cert: PathBuf,
    /// The leaf's private key, PKCS#8 PEM.
    pub key: PathBuf,
    /// Chain and key in one file, for HAProxy's `crt`.
    pub combined: PathBuf,
    pub client: Arc<ClientConfig>,
}

impl TlsSetup {
    /// Makes the CA and the leaf and writes the files into `dir`.
    pub fn new(dir: &Path) -> TlsSetup {
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let ca_key = rcgen::KeyPair::generate_for(alg).expect("CA key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "llmproxy bench CA");
        let ca = ca.self_signed(&ca_key).expect("CA certificate");
        let key = rcgen::KeyPair::generate_for(alg).expect("leaf key");
        let mut leaf =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, SERVER_NAME);
        let leaf = leaf
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf certificate");
        let chain = format!("{}{}", leaf.pem(), ca.pem());
        let key_pem = key.serialize_pem();
        let cert = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        let combined = dir.join("combined.pem");
        std::fs::write(&cert, &chain).expect("write cert.pem");
        std::fs::write(&key_path, &key_pem).expect("write key.pem");
        std::fs::write(&combined, format!("{chain}{key_pem}")).expect("write combined.pem");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).expect("trust the bench CA");
        TlsSetup {
            cert,
            key: key_path,
            combined,
            client: client_config(roots),
        }
    }
}

fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    let provider = CryptoProvider {
        cipher_suites: vec![ring::cipher_suite::TLS13_AES_256_GCM_SHA384],
        kx_groups: vec![ring::kx_group::X25519],
        ..ring::default_provider()
    };
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with the ring provider")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("valid server name")
}

/// A blocking TLS connection (setup and checks only, never timed).
pub fn connect_blocking(
    port: u16,
    cfg: &Arc<ClientConfig>,
) -> std::io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = ClientConnection::new(cfg.clone(), server_name()).map_err(std::io::Error::other)?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// What a server negotiated with the generator's config: "TLSv1_3 TLS13_AES_256_GCM_SHA384
/// X25519 http/1.1". Checked against what was asked before a TLS run counts.
pub fn negotiated(port: u16, cfg: &Arc<ClientConfig>) -> std::io::Result<String> {
    let mut s = connect_blocking(port, cfg)?;
    let c = &s.conn;
    let text = format!(
        "{:?} {:?} {:?} {}",
        c.protocol_version(),
        c.negotiated_cipher_suite().map(|s| s.suite()),
        c.negotiated_key_exchange_group().map(|g| g.name()),
        c.alpn_protocol()
            .map_or("no ALPN".into(), |a| String::from_utf8_lossy(a).to_string())
    )
    .replace("Some(", "")
    .replace(')', "");
    s.conn.send_close_notify();
    let _ = s.flush();
    let _ = s.sock.shutdown(std::net::Shutdown::Write);
    let _ = s.read(&mut [0u8; 256]);
    Ok(text)
}

/// What [`negotiated`] must return.
pub const EXPECTED: &str = "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519 http/1.1";

/// End-to-end check of the generator's TLS path, run by `cargo test --benches` (about 1 s):
/// the mock serving HTTPS with the bench's certificate negotiates exactly [`EXPECTED`]; the
/// keep-alive load makes its handshakes before the window and none inside it; the churn load
/// completes full handshakes; nothing fails.
pub fn self_test() {
    use crate::client::{request_bytes, Dest};
    use crate::load::{self, GenPlan, Window};
    use crate::sys::now_ns;

    let dir = std::env::temp_dir().join(format!("llmproxy-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let setup = TlsSetup::new(&dir);
    let mock = crate::services::Mock::start_tls(&dir, &[], &setup);
    let got = negotiated(mock.port(), &setup.client).expect("TLS handshake with the mock");
    assert_eq!(got, EXPECTED, "negotiated parameters");
    let dest = Dest {
        port: mock.port(),
        tls: Some(setup.client.clone()),
    };
    let plan = GenPlan {
        threads: 1,
        cpus: Vec::new(),
        epoll: false,
    };
    let ms = 1_000_000;
    let t0 = now_ns() + 150 * ms;
    let w = Window {
        t0,
        t1: t0 + 200 * ms,
    };
    let d = dest.clone();
    let rr = load::spawn(&plan, move |_, _| {
        load::rr(
            d.clone(),
            request_bytes(crate::scenarios::CHAT_BODY, &[]),
            4,
            w,
        )
    })
    .join()
    .pop()
    .unwrap();
    assert!(rr.requests > 0, "keep-alive requests over TLS");
    assert_eq!(rr.problems.errors, 0, "{:?}", rr.problems);
    assert_eq!(rr.problems.non_2xx_total(), 0, "{:?}", rr.problems);
    assert_eq!(rr.opened_in_window, 0, "handshakes inside the window");
    let stat = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
    let before = mock.stats();
    let t0 = now_ns() + 50 * ms;
    let w = Window {
        t0,
        t1: t0 + 200 * ms,
    };
    let churn = load::spawn(&plan, move |_, _| {
        load::churn(
            dest.clone(),
            request_bytes(
                crate::scenarios::CHAT_BODY,
                &[("connection", "close".into())],
            ),
            2,
            w,
        )
    })
    .join()
    .pop()
    .unwrap();
    assert!(churn.conns > 0, "new TLS connections");
    assert_eq!(churn.problems.errors, 0, "{:?}", churn.problems);
    let after = mock.stats();
    let accepted = stat(&after, "connections_accepted") - stat(&before, "connections_accepted");
    let requests = stat(&after, "requests") - stat(&before, "requests");
    // One connection per churned request, plus the connection of the second stats query (the
    // mock's own `/_mock/` endpoints are not counted as requests).
    assert!(
        requests >= churn.conns,
        "{requests} requests, {} measured",
        churn.conns
    );
    assert_eq!(
        accepted,
        requests + 1,
        "each churned request had its own connection ({accepted} accepted, {requests} requests)"
    );
    drop(mock);
    let _ = std::fs::remove_dir_all(&dir);
}
