//! One remote object and its ranged GETs: URL forms, S3 request signing, the validators that
//! detect a replaced object, status classification and retries with backoff.
//!
//! HTTP goes through `reqwest` (rustls with the ring provider, the platform's trust store);
//! S3 requests are presigned URLs (AWS Signature V4, by `rusty-s3`) fetched the same way, so
//! both kinds share every other line. Each response is checked against what the object looked
//! like when it was opened: `Content-Range`'s total size, and the ETag (else Last-Modified);
//! a strong ETag is also sent as `If-Match`, so servers that honour it refuse a changed object
//! with 412 before sending anything.

use crate::chunks::Chunks;
use crate::config::HttpConfig;
use crate::error::HttpError;
use diskstream_block::image::percent_decode;
use reqwest::header::{
    HeaderMap, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_MATCH, LAST_MODIFIED, RANGE,
};
use reqwest::StatusCode;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// How long a presigned S3 URL stays valid (it is used at once; the margin covers clock skew).
const PRESIGN_TTL: Duration = Duration::from_secs(3600);

/// Where the object lives.
enum Location {
    /// A plain `http://` or `https://` URL.
    Http(Url),
    /// An S3 object: requests are presigned per attempt.
    S3 {
        bucket: Box<Bucket>,
        key: String,
        credentials: Option<Credentials>,
    },
}

/// The identity of the object as opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Length in bytes.
    pub size: u64,
    /// The ETag, if the server sends one.
    pub etag: Option<String>,
    /// Last-Modified, if the server sends it.
    pub last_modified: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Location {
    fn parse(url: &str) -> Result<Location, HttpError> {
        let bad = |reason: &str| HttpError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => {
                let u = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
                if u.host_str().is_none_or(str::is_empty) {
                    return Err(bad("no host"));
                }
                Ok(Location::Http(u))
            }
            "s3" => {
                let (bucket, key) = rest
                    .split_once('/')
                    .ok_or_else(|| bad("expected s3://BUCKET/KEY"))?;
                if bucket.is_empty() || key.is_empty() {
                    return Err(bad("expected s3://BUCKET/KEY"));
                }
                if key.contains(['?', '#']) {
                    return Err(bad("S3 URLs take no query or fragment"));
                }
                let key = percent_decode(key).ok_or_else(|| bad("bad percent-encoding"))?;
                let region = env("AWS_REGION")
                    .or_else(|| env("AWS_DEFAULT_REGION"))
                    .unwrap_or_else(|| "us-east-1".to_string());
                // A custom endpoint (MinIO, moto, Ceph) is addressed path-style; AWS itself
                // virtual-host style.
                let (endpoint, style) =
                    match env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")) {
                        Some(e) => (e, UrlStyle::Path),
                        None => (
                            format!("https://s3.{region}.amazonaws.com"),
                            UrlStyle::VirtualHost,
                        ),
                    };
                let endpoint = Url::parse(&endpoint)
                    .map_err(|e| bad(&format!("invalid endpoint '{endpoint}': {e}")))?;
                let b = Bucket::new(endpoint, style, bucket.to_string(), region)
                    .map_err(|e| bad(&format!("invalid bucket: {e}")))?;
                b.object_url(&key)
                    .map_err(|e| bad(&format!("invalid key: {e}")))?;
                let credentials = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                    (Some(k), Some(s)) => Some(match env("AWS_SESSION_TOKEN") {
                        Some(t) => Credentials::new_with_token(k, s, t),
                        None => Credentials::new(k, s),
                    }),
                    _ => None,
                };
                Ok(Location::S3 {
                    bucket: Box::new(b),
                    key,
                    credentials,
                })
            }
            _ => Err(bad("scheme must be http, https or s3")),
        }
    }

    /// The URL of one GET (a fresh signature for S3).
    fn get_url(&self) -> Url {
        match self {
            Location::Http(u) => u.clone(),
            Location::S3 {
                bucket,
                key,
                credentials,
            } => rusty_s3::actions::GetObject::new(bucket, credentials.as_ref(), key)
                .sign(PRESIGN_TTL),
        }
    }
}

/// Whether an ETag is strong (usable with `If-Match`).
fn strong(etag: &str) -> bool {
    !etag.starts_with("W/")
}

fn header(h: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// Parse `bytes a-b/total` (or `bytes */total`).
fn content_range(v: &str) -> Option<(Option<(u64, u64)>, u64)> {
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = v.split_once('/')?;
    let total = total.trim().parse().ok()?;
    if range.trim() == "*" {
        return Some((None, total));
    }
    let (a, b) = range.split_once('-')?;
    Some((
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
        total,
    ))
}

/// A remote object: the HTTP client, where the object is and what it looked like when opened.
pub struct Fetcher {
    client: reqwest::Client,
    location: Location,
    url: String,
    cfg: HttpConfig,
    info: ObjectInfo,
}

/// The HTTP client of one object: the platform's trust store, or (`tls_verify` off) any
/// certificate.
fn client(cfg: &HttpConfig) -> Result<reqwest::Client, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let tls = if cfg.tls_verify {
        builder
            .with_platform_verifier()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(cfg.connect_timeout)
        .read_timeout(cfg.read_timeout)
        .pool_max_idle_per_host(cfg.connections.max(4))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())
}

/// Accepts every server certificate (QEMU's `sslverify: false`). Handshake signatures are
/// still checked, so the session is bound to the certificate's key; who holds it is not.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Fetcher {
    /// Parse `url`, connect, and learn the object's size and validators (one ranged GET of
    /// its first byte, which also proves the server supports ranges).
    pub async fn open(url: &str, cfg: &HttpConfig) -> Result<Fetcher, HttpError> {
        let location = Location::parse(url)?;
        let client = client(cfg).map_err(|e| HttpError::Protocol {
            url: url.to_string(),
            msg: format!("cannot set up the HTTP client: {e}"),
        })?;
        let mut f = Fetcher {
            client,
            location,
            url: url.to_string(),
            cfg: cfg.clone(),
            info: ObjectInfo::default(),
        };
        f.info = f.retrying(0, 1, |f| f.probe()).await?;
        Ok(f)
    }

    /// What the object looked like when opened.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn transient(&self, msg: impl Into<String>) -> HttpError {
        HttpError::Transient {
            url: self.url.clone(),
            msg: msg.into(),
        }
    }

    /// Classify a non-success status.
    fn status_error(&self, s: StatusCode) -> HttpError {
        let url = self.url.clone();
        let status = s.as_u16();
        match status {
            404 | 410 => HttpError::NotFound { url, status },
            401 | 403 => HttpError::Forbidden { url, status },
            412 => HttpError::Changed {
                url,
                what: "the server refused If-Match (HTTP 412)".to_string(),
            },
            408 | 429 | 500..=599 => self.transient(format!("HTTP {s}")),
            _ => HttpError::Protocol {
                url,
                msg: format!("unexpected HTTP {s}"),
            },
        }
    }

    fn send_error(&self, e: reqwest::Error) -> HttpError {
        // Connection refused/reset, timeouts, broken bodies: all worth another attempt.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        self.transient(msg)
    }

    async fn get(&self, range: &str, if_match: bool) -> Result<reqwest::Response, HttpError> {
        let mut req = self
            .client
            .get(self.location.get_url())
            .header(RANGE, range);
        if if_match {
            if let Some(e) = self.info.etag.as_deref().filter(|e| strong(e)) {
                req = req.header(IF_MATCH, e);
            }
        }
        req.send().await.map_err(|e| self.send_error(e))
    }

    /// The first GET: size and validators.
    async fn probe(&self) -> Result<ObjectInfo, HttpError> {
        let resp = self.get("bytes=0-0", false).await?;
        let h = resp.headers().clone();
        let status = resp.status();
        let info = |size| ObjectInfo {
            size,
            etag: header(&h, ETAG),
            last_modified: header(&h, LAST_MODIFIED),
        };
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let total = header(&h, CONTENT_RANGE)
                    .and_then(|v| content_range(&v))
                    .map(|(_, t)| t)
                    .ok_or_else(|| HttpError::Protocol {
                        url: self.url.clone(),
                        msg: "206 reply without a valid Content-Range".to_string(),
                    })?;
                Ok(info(total))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // An empty object: `bytes */0`.
                match header(&h, CONTENT_RANGE).and_then(|v| content_range(&v)) {
                    Some((None, 0)) => Ok(info(0)),
                    _ => Err(HttpError::Protocol {
                        url: self.url.clone(),
                        msg: "HTTP 416 for the first byte".to_string(),
                    }),
                }
            }
            StatusCode::OK => {
                let len = header(&h, CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
                if len == Some(0) {
                    return Ok(info(0));
                }
                Err(HttpError::NoRanges {
                    url: self.url.clone(),
                })
            }
            s => Err(self.status_error(s)),
        }
    }

    /// Check a response's validators against the object as opened.
    fn validate(&self, h: &HeaderMap, total: u64) -> Result<(), HttpError> {
        let changed = |what: String| HttpError::Changed {
            url: self.url.clone(),
            what,
        };
        if total != self.info.size {
            return Err(changed(format!("size {} is now {total}", self.info.size)));
        }
        let etag = header(h, ETAG);
        match (&self.info.etag, &etag) {
            (Some(a), Some(b)) if a != b => {
                return Err(changed(format!("ETag {a} is now {b}")));
            }
            (Some(_), Some(_)) => return Ok(()),
            _ => {}
        }
        if let (Some(a), Some(b)) = (&self.info.last_modified, header(h, LAST_MODIFIED)) {
            if *a != b {
                return Err(changed(format!("Last-Modified {a} is now {b}")));
            }
        }
        Ok(())
    }

    /// One attempt at `[offset, offset+len)`; returns a prefix (servers may shorten ranges).
    async fn fetch_once(&self, offset: u64, len: u64) -> Result<Chunks, HttpError> {
        let last = offset + len - 1;
        let mut resp = self.get(&format!("bytes={offset}-{last}"), true).await?;
        let status = resp.status();
        let h = resp.headers().clone();
        let (start, end) = match status {
            StatusCode::PARTIAL_CONTENT => {
                let (range, total) = header(&h, CONTENT_RANGE)
                    .and_then(|v| content_range(&v))
                    .ok_or_else(|| HttpError::Protocol {
                        url: self.url.clone(),
                        msg: "206 reply without a valid Content-Range".to_string(),
                    })?;
                self.validate(&h, total)?;
                match range {
                    Some((a, b)) if a == offset && b >= a && b <= last => (a, b + 1),
                    _ => {
                        return Err(HttpError::Protocol {
                            url: self.url.clone(),
                            msg: format!("asked for bytes {offset}-{last}, got {range:?}"),
                        })
                    }
                }
            }
            StatusCode::OK if offset == 0 && len == self.info.size => {
                self.validate(&h, self.info.size)?;
                (0, len)
            }
            StatusCode::OK => {
                return Err(HttpError::NoRanges {
                    url: self.url.clone(),
                })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(HttpError::Changed {
                    url: self.url.clone(),
                    what: "the object is shorter now (HTTP 416)".to_string(),
                })
            }
            s => return Err(self.status_error(s)),
        };
        // The body as received: chunks of the client's read buffers, not copied together.
        let want = (end - start) as usize;
        let mut body = Chunks::new();
        while let Some(c) = resp.chunk().await.map_err(|e| self.send_error(e))? {
            if body.len() + c.len() > want {
                return Err(HttpError::Protocol {
                    url: self.url.clone(),
                    msg: format!(
                        "the body of bytes {start}-{} is longer than the range",
                        end - 1
                    ),
                });
            }
            body.push(c);
        }
        if body.len() != want {
            return Err(self.transient(format!("short body: {} of {want} bytes", body.len())));
        }
        Ok(body)
    }

    /// Run `op` until it succeeds, fails for good, or transient failures used up the retries.
    async fn retrying<'a, T, F, Fut>(&'a self, offset: u64, len: u64, op: F) -> Result<T, HttpError>
    where
        F: Fn(&'a Fetcher) -> Fut,
        Fut: std::future::Future<Output = Result<T, HttpError>>,
    {
        let mut delay = self.cfg.retry_delay;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op(self).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt <= self.cfg.retries => {
                    tracing::info!("{e}; retrying in {delay:?} (attempt {attempt})");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(HttpError::Transient { msg, .. }) => {
                    return Err(HttpError::GaveUp {
                        url: self.url.clone(),
                        offset,
                        len,
                        attempts: attempt,
                        last: msg,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The bytes `[offset, offset+len)` (inside the object), with retries, as the body
    /// chunks they arrived in (no copy); a range the server shortened is completed by further
    /// requests.
    pub async fn fetch(&self, offset: u64, len: u64) -> Result<Chunks, HttpError> {
        let mut out = self
            .retrying(offset, len, |f| f.fetch_once(offset, len))
            .await?;
        while (out.len() as u64) < len {
            let pos = offset + out.len() as u64;
            let rest = len - out.len() as u64;
            let part = self
                .retrying(pos, rest, |f| f.fetch_once(pos, rest))
                .await?;
            out.append(part);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 0-9/100"), Some((Some((0, 9)), 100)));
        assert_eq!(content_range("bytes */0"), Some((None, 0)));
        assert_eq!(content_range("bytes 5-/9"), None);
        assert_eq!(content_range("items 0-1/2"), None);
    }

    #[test]
    fn url_forms() {
        assert!(matches!(
            Location::parse("http://h/x"),
            Ok(Location::Http(_))
        ));
        assert!(Location::parse("http://").is_err());
        assert!(Location::parse("s3://bucket").is_err());
        assert!(Location::parse("s3:///key").is_err());
        assert!(Location::parse("ftp://h/x").is_err());
        match Location::parse("s3://b/dir/a%20b.qcow2") {
            Ok(Location::S3 { key, .. }) => assert_eq!(key, "dir/a b.qcow2"),
            _ => panic!("s3 url"),
        }
    }
}
