//! Test certificates made at test time (nothing checked in): a CA and a leaf it signs for
//! `localhost` and `127.0.0.1` (CA:FALSE, serverAuth), written as PEM files.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::TempDir;

/// A CA and one server certificate it issued, as PEM files in a temporary directory.
pub struct Pki {
    pub dir: TempDir,
    pub ca_pem: String,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

impl Pki {
    /// A fresh CA `name` and a leaf for `localhost` / `127.0.0.1`.
    pub fn new(name: &str) -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();

        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

        let dir = TempDir::new();
        let write = |file: &str, text: &str| {
            let p = dir.0.join(file);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let ca_pem = ca_cert.pem();
        let ca_file = write("ca.pem", &ca_pem);
        let cert_file = write("cert.pem", &leaf_cert.pem());
        let key_file = write("key.pem", &leaf_key.serialize_pem());
        Pki {
            ca_pem,
            ca_file,
            cert_file,
            key_file,
            dir,
        }
    }

    /// Writes `text` to a file in this directory; returns its path.
    pub fn write(&self, file: &str, text: &str) -> String {
        let p = self.dir.0.join(file);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// A client config that trusts only this CA (ALPN http/1.1, ring).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}
