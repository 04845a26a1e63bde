//! Entry points for the cargo-fuzz targets and the seeded mutation tests of the QMP input path.
//!
//! Everything a QMP client sends passes through the JSON dialect parser ([`crate::json`]) and,
//! for options given on the daemon's command line, QEMU's dotted key=value parser
//! ([`crate::schema::parse_keyval`]); both then meet the schema validation
//! ([`crate::schema::check_blockdev_options`]). These functions drive all three with arbitrary
//! bytes and touch no file: the only acceptable outcomes are values and error texts, never a
//! panic, a hang or a huge allocation.

use crate::json::JsonStream;
use crate::schema::{check_blockdev_options, parse_keyval};
use serde_json::Value;

/// Feed `data` to the JSON stream parser in two pieces (split where the first byte says, so
/// the incremental state machine is exercised), then validate every object's `arguments` as
/// `blockdev-add` options. Returns the number of values and errors produced.
pub fn qmp_input(data: &[u8]) -> usize {
    let split = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut parser = JsonStream::new();
    let mut parsed = parser.feed(&data[..split]);
    parsed.extend(parser.feed(&data[split..]));
    let n = parsed.len();
    for v in parsed.into_iter().flatten() {
        if let Some(Value::Object(args)) = v.get("arguments") {
            let mut args = args.clone();
            let _ = check_blockdev_options(&mut args, "", false);
        }
        // Output must always serialise (the monitor echoes ids verbatim).
        let _ = crate::json::to_qemu_json(&v);
    }
    n
}

/// Parse `data` (lossily as UTF-8) as a `--blockdev` key=value string and validate it in keyval
/// mode, as the daemon's command line does. Returns whether it validated.
pub fn keyval(data: &[u8]) -> bool {
    let s = String::from_utf8_lossy(data);
    match parse_keyval(&s) {
        Ok(mut m) => check_blockdev_options(&mut m, "", true).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded mutation run over valid inputs: the fuzz targets' smoke test in `cargo test`.
    #[test]
    fn mutated_inputs_never_panic() {
        let seeds: [&[u8]; 6] = [
            br#"{"execute": "qmp_capabilities"}"#,
            br#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "a", "file": {"driver": "file", "filename": "x"}, "backing": null}}"#,
            br#"{'execute': 'query-version', 'id': [1, {"a": -1.5e300}]}"#,
            b"driver=qcow2,node-name=top,file.driver=file,file.filename=a,,b,read-only=on",
            br#"{"execute": "block-stream", "arguments": {"device": "\u00e9\ud800", "speed": 18446744073709551615}}"#,
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for seed in seeds {
            for _ in 0..2000 {
                let mut d = seed.to_vec();
                for _ in 0..(next() % 6) {
                    let i = (next() as usize) % (d.len() + 1);
                    match next() % 3 {
                        0 if i < d.len() => d[i] = next() as u8,
                        1 => d.insert(i, b"{}[]\",:'\\ea0-"[(next() % 13) as usize]),
                        _ if i < d.len() => {
                            d.remove(i);
                        }
                        _ => {}
                    }
                }
                qmp_input(&d);
                keyval(&d);
            }
        }
    }
}
