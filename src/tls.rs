//! TLS for sessiond's own connections: to controllers over `https`, and to
//! PostgreSQL. One place builds the rustls client configuration (the `ring`
//! provider, TLS 1.2 and 1.3), from a CA file when one is configured, or from
//! the system's trust store otherwise.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// The crypto provider every TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes `ring` the process's default provider, for HTTP clients built with
/// reqwest's defaults (the tests', the benchmark's). sessiond's own clients
/// pass their configuration explicitly. Calling it twice is harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificates of a PEM file, as trust anchors. Fails if the file cannot
/// be read or holds no certificate.
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

/// The system's trust store (`/etc/ssl/certs` and the like).
pub fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    for cert in found.certs {
        // A certificate the store holds but webpki cannot parse is skipped, as
        // every TLS client does; the others still verify.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
        return Err(format!("the system trust store holds no certificate{why}; set ca_file"));
    }
    Ok(roots)
}

/// Trust anchors: `ca_file` if set, else the system's.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    match ca_file {
        Some(path) => roots_from_file(path),
        None => system_roots(),
    }
}

/// A client configuration that verifies the server's certificate chain and
/// host name against `roots`.
pub fn client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Words for a failed TLS handshake that an operator can act on.
pub fn hint(problem: &str) -> Option<&'static str> {
    if problem.contains("NotValidForName") || problem.contains("not valid for name") {
        Some("the server's certificate is not valid for this host name: connect by a name it lists")
    } else if problem.contains("invalid peer certificate") || problem.contains("UnknownIssuer") {
        Some("the server's certificate does not verify against the trusted CAs; check ca_file")
    } else {
        None
    }
}

/// The TLS connector for PostgreSQL, with libpq's `sslmode` meanings:
/// `prefer` and `require` encrypt without verifying (unless a CA file is
/// given to `require`, which then verifies the chain, as libpq does with a
/// root certificate), `verify-ca` verifies the chain, `verify-full` the chain
/// and the host name.
pub fn postgres(
    mode: crate::config::SslMode,
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use crate::config::SslMode;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let verifying = |name: bool| -> Result<Arc<dyn rustls::client::danger::ServerCertVerifier>, String> {
        let roots = Arc::new(roots(ca_file)?);
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(if name { webpki } else { Arc::new(ChainOnly(webpki)) })
    };
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match (mode, ca_file) {
        (SslMode::VerifyFull, _) => verifying(true)?,
        (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => verifying(false)?,
        _ => Arc::new(Unverified(provider())),
    };
    let config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `verify-ca`: the chain must verify; the certificate need not name the host.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a CA: encryption without verification, as
/// libpq does. The handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
