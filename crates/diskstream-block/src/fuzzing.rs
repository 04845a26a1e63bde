//! Entry points shared by the cargo-fuzz targets and the seeded mutation tests.
//!
//! One function per parser surface, taking raw bytes and exercising everything an attacker-made
//! image reaches: header parsing, table loading, mapping, reads, block status, and writes that
//! allocate. The only acceptable outcomes are `Ok` or a clean error; a panic, a hang or a huge
//! allocation is a bug. Storage is in memory and capped, so a hostile image cannot grow it.

use crate::format::qcow2::Qcow2;
use crate::format::qed::Qed;
use crate::node::BlockNode;
use crate::protocol::mem::MemProtocol;
use crate::protocol::Protocol;
use std::sync::Arc;

/// Storage cap for fuzzed images (writes past it fail with ENOSPC).
const MAX_LEN: u64 = 64 << 20;

/// Open `data` as a qcow2 image and poke at it: map and read a few ranges, write a little when
/// the image opened read-write. Returns whether the image opened.
pub fn qcow2_image(data: &[u8]) -> bool {
    exercise(data, "fuzz.qcow2", |file| async move {
        Qcow2::open(file)
            .await
            .ok()
            .map(|q| Box::new(q) as Box<dyn BlockNode>)
    })
}

/// Open `data` as a QED image and poke at it the same way (a dirty image is checked and
/// repaired on the way in, so the repair code sees hostile tables too).
pub fn qed_image(data: &[u8]) -> bool {
    exercise(data, "fuzz.qed", |file| async move {
        Qed::open(file)
            .await
            .ok()
            .map(|q| Box::new(q) as Box<dyn BlockNode>)
    })
}

/// Open `data` with `open` on capped in-memory storage, then map, read and write a little.
fn exercise<F, Fut>(data: &[u8], name: &str, open: F) -> bool
where
    F: FnOnce(Arc<dyn Protocol>) -> Fut,
    Fut: std::future::Future<Output = Option<Box<dyn BlockNode>>>,
{
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return false;
    };
    rt.block_on(async {
        let file: Arc<dyn Protocol> =
            Arc::new(MemProtocol::new(name, data.to_vec(), false, MAX_LEN));
        let Some(q) = open(file).await else {
            return false;
        };
        let size = q.size();
        let probes = [0, size / 3, size / 2, size.saturating_sub(4096)];
        let mut buf = vec![0u8; 4096];
        for &off in &probes {
            let len = (size - off.min(size)).min(4096);
            if len == 0 {
                continue;
            }
            let _ = q.block_status(off, len).await;
            let _ = q.read(off, &mut buf[..len as usize]).await;
        }
        for &off in &probes[..2] {
            let len = (size - off.min(size)).min(1000);
            if len > 0 {
                let _ = q.write(off, &vec![0x5a; len as usize]).await;
                let _ = q.read(off, &mut buf[..len as usize]).await;
            }
        }
        let _ = q.close().await;
        true
    })
}
