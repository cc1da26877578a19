//! TLS settings (startup): the rustls configs of HTTPS listeners and HTTPS upstreams, built once
//! when the config is loaded and shared (`Arc`) by every shard; [`stream`] is the connection
//! type the shards use.
//!
//! rustls runs on `ring`, always through `builder_with_provider`, so no process-wide default
//! provider is needed (and aws-lc-rs is never compiled in). ALPN offers `http/1.1` on both
//! sides. Upstream certificates are checked against the Mozilla roots compiled in
//! (webpki-roots) plus the system store, read once per process; a missing system store is not
//! an error. An upstream's `ca_file` replaces both with the bundle it names.

pub mod stream;

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// The only application protocol spoken on either side.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Sessions each shard remembers for resumption, per listener and per upstream (rustls's
/// default size).
const SESSION_CACHE: usize = 256;

/// A shard's own copy of a listener config. rustls keeps its session cache behind a mutex; with
/// one cache per shard that mutex is only ever taken by one thread, so a handshake never waits
/// for another shard's. (A client resuming on another shard gets a full handshake.)
pub fn shard_server_config(shared: &Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut c = (**shared).clone();
    c.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Arc::new(c)
}

/// A shard's own copy of an upstream config, with its own resumption store (see
/// [`shard_server_config`]).
pub fn shard_client_config(shared: &Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut c = (**shared).clone();
    c.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE);
    Arc::new(c)
}

/// The crypto provider for every config (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A problem with a TLS file, and which key of the `tls` block it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFileError {
    /// `cert_file`, `key_file` or `ca_file`; empty for the block as a whole.
    pub key: &'static str,
    pub message: String,
}

impl TlsFileError {
    fn new(key: &'static str, message: impl Into<String>) -> Self {
        TlsFileError {
            key,
            message: message.into(),
        }
    }
}

fn read_file(key: &'static str, path: &str) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| TlsFileError::new(key, format!("cannot read `{path}`: {e}")))
}

/// Every certificate in a PEM file; at least one.
fn load_certs(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::new(key, format!("`{path}` is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsFileError::new(
            key,
            format!("no `BEGIN CERTIFICATE` block in `{path}`"),
        ));
    }
    Ok(certs)
}

/// The listener config for a certificate chain (leaf first) and its private key, both PEM.
/// Checks that the files are readable, hold what they should, and that the key matches the
/// leaf certificate.
pub fn server_config(
    cert_file: &str,
    key_file: &str,
) -> Result<Arc<ServerConfig>, Vec<TlsFileError>> {
    let certs = load_certs("cert_file", cert_file);
    let key = read_file("key_file", key_file).and_then(|pem| {
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            let why = match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no private key (`BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block)".to_owned()
                }
                e => format!("not a valid PEM private key ({e})"),
            };
            TlsFileError::new("key_file", format!("`{key_file}`: {why}"))
        })
    });
    let (certs, key) = match (certs, key) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![TlsFileError::new("", format!("TLS setup failed: {e}"))])?;
    let mut cfg = builder
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            vec![match e {
                rustls::Error::InconsistentKeys(_) => TlsFileError::new(
                    "key_file",
                    format!("the private key in `{key_file}` does not belong to the certificate in `{cert_file}`"),
                ),
                e => TlsFileError::new(
                    "",
                    format!("cannot use `{cert_file}` with `{key_file}`: {e}"),
                ),
            }]
        })?;
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// Mozilla's roots plus the system store, read once per process.
fn default_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            // A host without a system store (minimal containers) still has the Mozilla roots.
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(
                system_roots = added,
                total = roots.len(),
                "loaded TLS trust anchors"
            );
            Arc::new(roots)
        })
        .clone()
}

/// The upstream-side config: verification against `ca_file` (a PEM bundle that replaces the
/// default roots) or the default roots, or no verification at all.
pub fn client_config(
    ca_file: Option<&str>,
    insecure_skip_verify: bool,
) -> Result<Arc<ClientConfig>, TlsFileError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::new("", format!("TLS setup failed: {e}")))?;
    let mut cfg = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let roots = match ca_file {
            None => default_roots(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for (i, c) in load_certs("ca_file", path)?.into_iter().enumerate() {
                    roots.add(c).map_err(|e| {
                        TlsFileError::new(
                            "ca_file",
                            format!("certificate {} in `{path}` is not a usable CA: {e}", i + 1),
                        )
                    })?;
                }
                Arc::new(roots)
            }
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// The name sent as SNI and checked against the certificate: a DNS name, or an IP address
/// (checked against the certificate's IP SANs; no SNI is sent for it).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|_| format!("`{host}` is not a valid TLS server name"))
}

/// A rustls error inside an IO error from a handshake, if there is one.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// `insecure_skip_verify: true`: any certificate is accepted (the handshake signatures are still
/// checked, so the connection is encrypted, just not authenticated).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
