//! TLS at the edge: `https://` and `wss://` with rustls (on ring; no OpenSSL).
//!
//! [`TlsConfig::load`] reads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or
//! SEC1) and checks that they belong together; [`crate::serve_tls`] then serves the router
//! exactly like [`crate::serve`], with each connection's TLS handshake counted as a pending
//! connection and bounded by the header-read timeout. [`TlsConfig::reload`] re-reads both files
//! and swaps the certificate for new handshakes without touching open connections; a reload
//! that fails keeps the previous certificate. [`reload_on_sighup`] does that on every `SIGHUP`.
//!
//! Protocol versions (TLS 1.2 and 1.3), cipher suites and key exchange groups are rustls's
//! defaults for its ring provider; ALPN offers `http/1.1` only (WebSocket upgrades need it).
//!
//! ```no_run
//! # async fn run<P: switchboard_core::Protocol>(protocol: P) -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_server::tls::{TlsConfig, reload_on_sighup};
//! use switchboard_server::{ServerConfig, bind, router, serve_tls};
//! let tls = TlsConfig::load("cert.pem", "key.pem")?;
//! let config = ServerConfig::default();
//! let (app, handle) = router(std::sync::Arc::new(protocol), config.clone());
//! let listener = bind("127.0.0.1:8443".parse()?, config.accept_backlog)?;
//! tokio::spawn(switchboard_server::shutdown_on_signal(handle.clone()));
//! tokio::spawn(reload_on_sighup(tls.clone(), handle.clone()));
//! serve_tls(listener, app, &handle, config.shutdown_grace, &tls).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{error, info};

use crate::ServerHandle;

/// Why a certificate or key could not be used. Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error(
        "{}: no certificate found (expected a PEM certificate chain: `-----BEGIN CERTIFICATE-----` blocks, the server's own certificate first)",
        path.display()
    )]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no PEM private key.
    #[error(
        "{}: no private key found (expected a PEM private key: PKCS#8 `BEGIN PRIVATE KEY`, PKCS#1 `BEGIN RSA PRIVATE KEY` or SEC1 `BEGIN EC PRIVATE KEY`)",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid PEM.
    #[error("{}: invalid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the parser found wrong.
        reason: String,
    },
    /// The certificate cannot be parsed, the key is of an unsupported type, or the key does not
    /// belong to the certificate.
    #[error("{} with {}: {reason}", cert.display(), key.display())]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls refused.
        reason: String,
    },
    /// rustls refused to build a server configuration with the ring provider's defaults.
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// A loaded certificate and key, and the rustls server configuration that serves them.
///
/// Cheap to clone; every clone shares the same certificate, so [`TlsConfig::reload`] on any of
/// them changes what every server using it presents to new handshakes.
#[derive(Clone)]
pub struct TlsConfig {
    cert_path: PathBuf,
    key_path: PathBuf,
    resolver: Arc<ReloadableCert>,
    server_config: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads the PEM certificate chain at `cert` (the server's certificate first, then any
    /// intermediates) and the PEM private key at `key` (PKCS#8, PKCS#1 or SEC1), and checks that
    /// the key belongs to the certificate.
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let cert_path = cert.into();
        let key_path = key.into();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = load_certified_key(&cert_path, &key_path, &provider)?;
        let resolver = Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(certified)),
        });
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // Only HTTP/1.1 is served (WebSocket upgrades need it): say so, so that a client that
        // would prefer h2 does not assume it.
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            cert_path,
            key_path,
            resolver,
            server_config: Arc::new(server_config),
        })
    }

    /// Re-reads the certificate and key files and, if they are usable, presents the new
    /// certificate to every handshake from now on. Open connections are not touched. On error
    /// the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let provider = self.server_config.crypto_provider();
        let certified = load_certified_key(&self.cert_path, &self.key_path, provider)?;
        let mut current = self
            .resolver
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *current = Arc::new(certified);
        Ok(())
    }

    /// The certificate chain file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The private key file.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// The rustls server configuration (its certificate resolver follows [`TlsConfig::reload`]).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config.clone())
    }
}

/// Reloads `tls` on every `SIGHUP` until `handle` shuts down, logging each outcome: info with
/// the files on success, error with the reason on failure (the previous certificate stays in
/// use). On platforms without `SIGHUP`, or if the signal cannot be watched, it waits for the
/// shutdown and does nothing. The `SIGHUP` handler is installed by the call, not on the first
/// poll, so a hangup sent once the server is listening never finds the default action (which
/// would end the process). Must be called inside a tokio runtime.
pub fn reload_on_sighup(
    tls: TlsConfig,
    handle: ServerHandle,
) -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let mut hangups = match hangups {
                Ok(hangups) => hangups,
                Err(error) => {
                    error!(%error, "cannot watch SIGHUP: the TLS certificate will not be reloaded");
                    handle.shutdown_requested().await;
                    return;
                }
            };
            loop {
                tokio::select! {
                    () = handle.shutdown_requested() => return,
                    received = hangups.recv() => {
                        if received.is_none() {
                            return;
                        }
                    }
                }
                reload_and_log(&tls);
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tls;
            handle.shutdown_requested().await;
        }
    }
}

/// One reload with its log line.
fn reload_and_log(tls: &TlsConfig) {
    match tls.reload() {
        Ok(()) => info!(
            cert = %tls.cert_path.display(),
            key = %tls.key_path.display(),
            "TLS certificate reloaded"
        ),
        Err(error) => error!(
            %error,
            "TLS certificate reload failed; still serving the previous certificate: {error}"
        ),
    }
}

/// The certificate every handshake gets: swapped whole on reload, so a handshake sees either
/// the old or the new certificate and key, never a mix.
#[derive(Debug)]
struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_certificates(cert_path)?;
    let key = read_key(key_path)?;
    CertifiedKey::from_der(chain, key, provider).map_err(|error| TlsError::Unusable {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        reason: describe(&error),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every `CERTIFICATE` block of a PEM file, in order; other blocks (e.g. a key kept in the same
/// file) are skipped.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(path, &error))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| match error {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        other => pem_error(path, &other),
    })
}

fn pem_error(path: &Path, error: &pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

/// rustls's own wording, made specific for the one mistake operators make most.
fn describe(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key does not belong to the certificate".to_owned()
        }
        other => other.to_string(),
    }
}
