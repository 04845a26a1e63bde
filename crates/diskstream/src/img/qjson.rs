//! JSON text exactly as qemu-img prints it (`--output=json` of `info` and `check`).
//!
//! QEMU builds these objects as `QDict`s, hash tables with 512 buckets, and prints them in
//! bucket order (within a bucket, the last inserted key first), indented by four spaces, with
//! empty objects and arrays spread over two lines and every non-ASCII character escaped. We
//! reproduce that order from the same hash function, so the output of both tools can be
//! compared byte for byte.

use serde_json::Value;
use std::fmt::Write;

/// QEMU's `tdb_hash` bucket of a dictionary key.
fn bucket(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// Keys in the order QEMU inserts them (QAPI declaration order of `ImageInfo`, `ImageCheck`
/// and the qcow2 specific data). Keys sharing a bucket print in reverse insertion order.
const INSERTION_ORDER: &[&str] = &[
    "filename",
    "format",
    "dirty-flag",
    "actual-size",
    "virtual-size",
    "cluster-size",
    "encrypted",
    "compressed",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "format-specific",
    "backing-image",
    "children",
    "check-errors",
    "image-end-offset",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "compat",
    "data-file",
    "data-file-raw",
    "extended-l2",
    "lazy-refcounts",
    "corrupt",
    "refcount-bits",
    "encrypt",
    "bitmaps",
    "compression-type",
];

fn sort_key(key: &str) -> (u32, std::cmp::Reverse<usize>, String) {
    let pos = INSERTION_ORDER
        .iter()
        .position(|k| *k == key)
        .unwrap_or(usize::MAX);
    (bucket(key), std::cmp::Reverse(pos), key.to_string())
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    for _ in 0..indent {
        out.push_str("    ");
    }
}

fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn value(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                value(out, item, indent + 1);
            }
            newline(out, indent);
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by_cached_key(|k| sort_key(k));
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                string(out, k);
                out.push_str(": ");
                value(out, &map[k.as_str()], indent + 1);
            }
            newline(out, indent);
            out.push('}');
        }
    }
}

/// `v` as qemu-img prints it (without the final newline).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    value(&mut out, v, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_key_order_and_layout() {
        let v = json!({
            "filename": "a.qcow2",
            "format": "qcow2",
            "check-errors": 0,
            "image-end-offset": 851968,
            "total-clusters": 64,
            "allocated-clusters": 8,
        });
        assert_eq!(
            to_string(&v),
            "{\n    \"image-end-offset\": 851968,\n    \"total-clusters\": 64,\n    \
             \"check-errors\": 0,\n    \"allocated-clusters\": 8,\n    \
             \"filename\": \"a.qcow2\",\n    \"format\": \"qcow2\"\n}"
        );
        // Same bucket: the later QAPI field prints first.
        assert_eq!(bucket("children"), bucket("backing-filename-format"));
        let v = json!({"backing-filename-format": "raw", "children": []});
        assert_eq!(
            to_string(&v),
            "{\n    \"children\": [\n    ],\n    \"backing-filename-format\": \"raw\"\n}"
        );
        assert_eq!(
            to_string(&json!({"data": {}})),
            "{\n    \"data\": {\n    }\n}"
        );
    }

    #[test]
    fn strings_escape_like_qemu() {
        assert_eq!(
            to_string(&json!("a\"b\\c\nd/é")),
            "\"a\\\"b\\\\c\\nd/\\u00E9\""
        );
        assert_eq!(to_string(&json!("\u{1F600}")), "\"\\uD83D\\uDE00\"");
    }
}
