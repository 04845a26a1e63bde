//! Listening sockets for the monitor: unix sockets (QSD's `--chardev socket,path=..`) and TCP
//! (`host=..,port=..`). Every accepted client gets its own [`crate::Monitor::serve`] task.

use crate::monitor::Monitor;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};

/// Where a monitor listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path (created; a stale file is replaced).
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
}

/// A bound listener.
pub enum Listener {
    /// Unix.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Bind now (so errors are reported before the daemon says it is ready).
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Unix(p) => {
                if p.exists() {
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)?;
                // The monitor can open any file the daemon may: only its owner may connect.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(l, p.clone()))
            }
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
        }
    }

    /// Accept clients forever, serving each on its own task.
    pub async fn run(self, mon: Arc<Monitor>) {
        loop {
            match &self {
                Listener::Unix(l, _) => match l.accept().await {
                    Ok((s, _)) => {
                        let m = Arc::clone(&mon);
                        tokio::spawn(async move { m.serve(s).await });
                    }
                    Err(e) => tracing::warn!("QMP accept: {e}"),
                },
                Listener::Tcp(l) => match l.accept().await {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        let m = Arc::clone(&mon);
                        tokio::spawn(async move { m.serve(s).await });
                    }
                    Err(e) => tracing::warn!("QMP accept: {e}"),
                },
            }
        }
    }

    /// Remove the socket file (shutdown).
    pub fn cleanup(&self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The path of a unix listener.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Listener::Unix(_, p) => Some(p.clone()),
            Listener::Tcp(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_socket_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ds-qmp-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("qmp.sock");
        let l = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may drive the monitor");
        l.cleanup();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
