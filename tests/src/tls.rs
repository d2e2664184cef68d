//! TLS for the tests: a certificate authority made in the test, and a TLS-terminating proxy
//! in front of a plain service (the dispatcher's HTTP port, RabbitMQ's 5672, Redis's 6379), so
//! that clients can be run over `https://`, `amqps://` and `rediss://` against the shared
//! services without reconfiguring them.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A test CA and one server certificate it signed, for `127.0.0.1` and `localhost`.
pub struct TestCa {
    /// The CA's certificate (PEM), for `tls.ca_file`.
    pub ca_pem: String,
    /// The server certificate and its key (PEM), for a server of the test's own.
    pub server_cert_pem: String,
    pub server_key_pem: String,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self> {
        gantry_shared::tls::install_provider();
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
            server_cert: cert.der().clone(),
            server_key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    /// Write the CA (and any further PEM certificates) into `dir`; the file's path.
    pub fn write_bundle(&self, dir: &Path, extra_pem: &[String]) -> Result<PathBuf> {
        let path = dir.join("ca.pem");
        let mut text = self.ca_pem.clone();
        for e in extra_pem {
            text.push_str(e);
        }
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// Accepts TLS on a free port of 127.0.0.1 with the test CA's server certificate and forwards
/// the plain bytes to `target`. Counts the handshakes that succeeded.
pub struct TlsProxy {
    pub port: u16,
    pub handshakes: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(target: &str, ca: &TestCa) -> Result<Self> {
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![ca.server_cert.clone()], ca.server_key.clone_key())
            .context("the test server certificate")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let target = target.to_owned();
        let accept = {
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, target, handshakes) =
                        (acceptor.clone(), target.clone(), handshakes.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        handshakes.fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut out).await;
                        }
                    });
                }
            })
        };
        Ok(Self {
            port,
            handshakes,
            accept,
        })
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
