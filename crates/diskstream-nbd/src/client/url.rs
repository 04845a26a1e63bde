//! NBD URLs as QEMU and libnbd write them.
//!
//! * `nbd://host[:port]/export` and `nbd+tcp://…` (port 10809 by default, `[v6addr]` allowed),
//! * `nbd+unix:///export?socket=/path/to/socket`.
//!
//! The export name is the path without its leading `/`, percent-decoded (`nbd://h/` and
//! `nbd://h` both name the default export ""). These are the strings that end up in a qcow2
//! header as a backing file name, so only the syntax QEMU accepts is accepted here: a TCP URL
//! carries no query, a unix URL exactly one `socket=` parameter and no host. `nbds://` (TLS)
//! is recognised and refused with a clear message.

use super::error::ClientError;
use diskstream_block::image::percent_decode;
use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// URL schemes this module parses (the ones registered with the block layer).
pub const SCHEMES: &[&str] = &["nbd", "nbd+tcp", "nbd+unix"];

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A TCP server.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix domain socket.
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A parsed NBD URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUrl {
    /// The server.
    pub address: Address,
    /// The export name ("" is the default export).
    pub export: String,
}

impl NbdUrl {
    /// Parse `url` (see the module documentation for the accepted forms).
    pub fn parse(url: &str) -> Result<NbdUrl, ClientError> {
        let bad = |reason: &str| ClientError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://"))?;
        let scheme = scheme.to_ascii_lowercase();
        let unix = match scheme.as_str() {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" => {
                return Err(bad("TLS (nbds://) is not supported by this client"))
            }
            _ => return Err(bad("scheme must be nbd, nbd+tcp or nbd+unix")),
        };
        if rest.contains('#') {
            return Err(bad("fragments are not allowed"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
            .ok_or_else(|| bad("bad percent-encoding in the export name"))?;
        if export.len() > crate::proto::MAX_STRING {
            return Err(bad("export name longer than 4096 bytes"));
        }
        if unix {
            if !authority.is_empty() {
                return Err(bad(
                    "nbd+unix URLs take no host (write nbd+unix:///export?socket=PATH)",
                ));
            }
            let q = query.ok_or_else(|| bad("missing ?socket=PATH"))?;
            let socket = q
                .strip_prefix("socket=")
                .filter(|s| !s.contains('&'))
                .ok_or_else(|| bad("the only query parameter allowed is socket=PATH"))?;
            let socket =
                percent_decode(socket).ok_or_else(|| bad("bad percent-encoding in socket"))?;
            if socket.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(NbdUrl {
                address: Address::Unix(PathBuf::from(socket)),
                export,
            });
        }
        if query.is_some() {
            return Err(bad("TCP URLs take no query parameters"));
        }
        let authority = match authority.rsplit_once('@') {
            Some(_) => return Err(bad("user information is not supported")),
            None => authority,
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unterminated [IPv6] host"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("garbage after ]"))?),
            };
            (h.to_string(), port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p.parse::<u16>().map_err(|_| bad("invalid port"))?,
        };
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        Ok(NbdUrl {
            address: Address::Tcp { host, port },
            export,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUrl {
        NbdUrl {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_urls() {
        assert_eq!(
            NbdUrl::parse("nbd://h:1234/disk").ok(),
            Some(tcp("h", 1234, "disk"))
        );
        assert_eq!(
            NbdUrl::parse("nbd://h").ok(),
            Some(tcp("h", DEFAULT_PORT, ""))
        );
        assert_eq!(
            NbdUrl::parse("nbd://h/").ok(),
            Some(tcp("h", DEFAULT_PORT, ""))
        );
        assert_eq!(
            NbdUrl::parse("nbd+tcp://[::1]:99/a%20b/c").ok(),
            Some(tcp("::1", 99, "a b/c"))
        );
        assert!(NbdUrl::parse("nbd://h:99999/x").is_err());
        assert!(NbdUrl::parse("nbd://h/x?socket=/s").is_err());
        assert!(NbdUrl::parse("nbds://h/x").is_err());
        assert!(NbdUrl::parse("http://h/x").is_err());
        assert!(NbdUrl::parse("nbd://h/%zz").is_err());
    }

    #[test]
    fn unix_urls() {
        let u = NbdUrl::parse("nbd+unix:///exp?socket=/tmp/s.sock").ok();
        assert_eq!(
            u,
            Some(NbdUrl {
                address: Address::Unix("/tmp/s.sock".into()),
                export: "exp".into()
            })
        );
        let u = NbdUrl::parse("nbd+unix://?socket=/tmp/s").ok();
        assert_eq!(u.map(|u| u.export), Some(String::new()));
        assert!(NbdUrl::parse("nbd+unix:///exp").is_err());
        assert!(NbdUrl::parse("nbd+unix://host/exp?socket=/s").is_err());
        assert!(NbdUrl::parse("nbd+unix:///exp?socket=/s&x=1").is_err());
    }
}
