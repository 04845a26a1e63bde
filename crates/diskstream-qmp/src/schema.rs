//! Argument validation with QEMU's QAPI visitor semantics and error texts.
//!
//! QEMU validates a command's arguments before running it: members are visited in schema
//! order ("Parameter 'device' is missing", "Invalid parameter type for 'speed', expected:
//! integer", "Parameter 'on-error' does not accept value 'x'"), nested members are named with
//! dotted paths ("Parameter 'file.filename' is missing"), and leftovers are refused afterwards
//! ("Parameter 'bogus' is unexpected"). Clients (and tests written against QSD) match these
//! texts, so the schemas of the supported commands are declared here and checked the same way
//! before any side effect. With `keyval` (command-line `--blockdev a=b,c.d=e`) scalar members
//! arrive as strings and are converted as QEMU's keyval visitor does.

use crate::error::{QmpError, QmpResult};
use serde_json::{Map, Value};

/// A member type.
#[derive(Clone, Copy, Debug)]
pub enum Ty {
    /// `str`.
    Str,
    /// `int` (and the 64-bit unsigned/size types).
    Int,
    /// `uint32` ("Parameter 'x' expects uint32_t" when out of range).
    U32,
    /// `bool`.
    Bool,
    /// An enum with these values.
    Enum(&'static [&'static str]),
    /// Anything (not validated further).
    Any,
    /// A struct with these members.
    Obj(&'static [Member]),
    /// A list of this type.
    List(&'static Ty),
    /// A flat union: base members (the tag among them), then the tag's variant members.
    Union(&'static Union),
    /// `BlockdevRef`: inline options or a node name.
    BlockdevRef,
    /// `BlockdevRefOrNull`: inline options, a node name or `null`.
    BlockdevRefOrNull,
}

/// A struct member.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    /// Name.
    pub name: &'static str,
    /// Type.
    pub ty: Ty,
    /// Whether it may be omitted.
    pub optional: bool,
}

/// A flat union (QAPI `union` with a `discriminator`).
#[derive(Debug)]
pub struct Union {
    /// Common members, the tag (an enum) among them.
    pub base: &'static [Member],
    /// The discriminator member.
    pub tag: &'static str,
    /// Members of each variant, by tag value (a value without an entry has none).
    pub variants: &'static [(&'static str, &'static [Member])],
}

/// A required member.
pub const fn req(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// An optional member.
pub const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// `BlockdevOnError`.
pub const ON_ERROR: Ty = Ty::Enum(&["report", "ignore", "enospc", "stop", "auto"]);

/// Every value of QSD 10.0's `BlockdevDriver`, so unknown drivers get QEMU's enum error and
/// known-but-unsupported ones a clear diskstream error.
pub const DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

const CACHE: &[Member] = &[opt("direct", Ty::Bool), opt("no-flush", Ty::Bool)];

/// Members every `BlockdevOptions` has, before the driver-specific ones.
pub const BLOCKDEV_BASE: &[Member] = &[
    req("driver", Ty::Enum(DRIVERS)),
    opt("node-name", Ty::Str),
    opt("discard", Ty::Enum(&["ignore", "unmap"])),
    opt("cache", Ty::Obj(CACHE)),
    opt("active", Ty::Bool),
    opt("read-only", Ty::Bool),
    opt("auto-read-only", Ty::Bool),
    opt("force-share", Ty::Bool),
    opt("detect-zeroes", Ty::Enum(&["off", "on", "unmap"])),
];

const FILE: &[Member] = &[
    req("filename", Ty::Str),
    opt("pr-manager", Ty::Str),
    opt("locking", Ty::Enum(&["auto", "on", "off"])),
    opt("aio", Ty::Enum(&["threads", "native", "io_uring"])),
    opt("aio-max-batch", Ty::Int),
    opt("drop-cache", Ty::Bool),
    opt("x-check-cache-dropped", Ty::Bool),
];

const RAW: &[Member] = &[
    req("file", Ty::BlockdevRef),
    opt("offset", Ty::Int),
    opt("size", Ty::Int),
];

const QCOW2: &[Member] = &[
    req("file", Ty::BlockdevRef),
    opt("backing", Ty::BlockdevRefOrNull),
    opt("lazy-refcounts", Ty::Bool),
    opt("pass-discard-request", Ty::Bool),
    opt("pass-discard-snapshot", Ty::Bool),
    opt("pass-discard-other", Ty::Bool),
    opt("discard-no-unref", Ty::Bool),
    opt("overlap-check", Ty::Any),
    opt("cache-size", Ty::Int),
    opt("l2-cache-size", Ty::Int),
    opt("l2-cache-entry-size", Ty::Int),
    opt("refcount-cache-size", Ty::Int),
    opt("cache-clean-interval", Ty::Int),
    opt("encrypt", Ty::Any),
    opt("data-file", Ty::BlockdevRef),
];

/// `BlockdevOptionsGenericCOWFormat`, what QEMU's `qed` takes.
const GENERIC_COW: &[Member] = &[
    req("file", Ty::BlockdevRef),
    opt("backing", Ty::BlockdevRefOrNull),
];

const INJECT_ERROR: &[Member] = &[
    req("event", Ty::Str),
    opt(
        "iotype",
        Ty::List(&Ty::Enum(&[
            "read",
            "write",
            "write-zeroes",
            "discard",
            "flush",
            "block-status",
        ])),
    ),
    opt("errno", Ty::Int),
    opt("sector", Ty::Int),
    opt("once", Ty::Bool),
    opt("immediately", Ty::Bool),
    opt("state", Ty::Int),
];

const BLKDEBUG: &[Member] = &[
    req("image", Ty::BlockdevRef),
    opt("config", Ty::Str),
    opt("align", Ty::Int),
    opt("max-transfer", Ty::Int),
    opt("opt-write-zero", Ty::Int),
    opt("max-write-zero", Ty::Int),
    opt("opt-discard", Ty::Int),
    opt("max-discard", Ty::Int),
    opt("inject-error", Ty::List(&Ty::Obj(INJECT_ERROR))),
    opt("set-state", Ty::List(&Ty::Any)),
    opt("take-child-perms", Ty::List(&Ty::Str)),
    opt("unshare-child-perms", Ty::List(&Ty::Str)),
];

const INET: &[Member] = &[
    req("host", Ty::Str),
    req("port", Ty::Str),
    opt("numeric", Ty::Bool),
    opt("to", Ty::Int),
    opt("ipv4", Ty::Bool),
    opt("ipv6", Ty::Bool),
    opt("keep-alive", Ty::Bool),
    opt("mptcp", Ty::Bool),
];
const UNIX: &[Member] = &[
    req("path", Ty::Str),
    opt("abstract", Ty::Bool),
    opt("tight", Ty::Bool),
];
const VSOCK: &[Member] = &[req("cid", Ty::Str), req("port", Ty::Str)];
const FD: &[Member] = &[req("str", Ty::Str)];
const SOCKET_TYPE: &[Member] = &[req("type", Ty::Enum(&["inet", "unix", "vsock", "fd"]))];

/// `SocketAddress` (flat: `{"type": "unix", "path": ...}`), as `blockdev-add`'s nbd `server`
/// and the `--nbd-server addr.*` command line take it.
pub const SOCKET_ADDRESS: Union = Union {
    base: SOCKET_TYPE,
    tag: "type",
    variants: &[("inet", INET), ("unix", UNIX), ("vsock", VSOCK), ("fd", FD)],
};

/// `SocketAddressLegacy` (`{"type": "unix", "data": {"path": ...}}`), as `nbd-server-start`
/// takes it.
pub const SOCKET_ADDRESS_LEGACY: Union = Union {
    base: SOCKET_TYPE,
    tag: "type",
    variants: &[
        ("inet", &[req("data", Ty::Obj(INET))]),
        ("unix", &[req("data", Ty::Obj(UNIX))]),
        ("vsock", &[req("data", Ty::Obj(VSOCK))]),
        ("fd", &[req("data", Ty::Obj(FD))]),
    ],
};

const NBD: &[Member] = &[
    req("server", Ty::Union(&SOCKET_ADDRESS)),
    opt("export", Ty::Str),
    opt("tls-creds", Ty::Str),
    opt("tls-hostname", Ty::Str),
    opt("x-dirty-bitmap", Ty::Str),
    opt("reconnect-delay", Ty::U32),
    opt("open-timeout", Ty::U32),
];

/// `BlockdevOptionsCurlBase`: QEMU's curl drivers.
const CURL_HTTP: &[Member] = &[
    req("url", Ty::Str),
    opt("readahead", Ty::Int),
    opt("timeout", Ty::Int),
    opt("username", Ty::Str),
    opt("password-secret", Ty::Str),
    opt("proxy-username", Ty::Str),
    opt("proxy-password-secret", Ty::Str),
    opt("cookie", Ty::Str),
    opt("cookie-secret", Ty::Str),
];

/// `BlockdevOptionsCurlHttps`: the http members and `sslverify`.
const CURL_HTTPS: &[Member] = &[
    req("url", Ty::Str),
    opt("readahead", Ty::Int),
    opt("timeout", Ty::Int),
    opt("username", Ty::Str),
    opt("password-secret", Ty::Str),
    opt("proxy-username", Ty::Str),
    opt("proxy-password-secret", Ty::Str),
    opt("cookie", Ty::Str),
    opt("sslverify", Ty::Bool),
    opt("cookie-secret", Ty::Str),
];

/// QEMU's members, then diskstream's fetch unit (bytes) and read-ahead (units) knobs.
const COPY_ON_READ: &[Member] = &[
    req("file", Ty::BlockdevRef),
    opt("bottom", Ty::Str),
    opt("x-granularity", Ty::Int),
    opt("x-readahead", Ty::U32),
];

/// The driver-specific members diskstream knows, if any.
pub fn driver_members(driver: &str) -> Option<&'static [Member]> {
    Some(match driver {
        "file" => FILE,
        "raw" => RAW,
        "qcow2" => QCOW2,
        "qed" => GENERIC_COW,
        "blkdebug" => BLKDEBUG,
        "copy-on-read" => COPY_ON_READ,
        "nbd" => NBD,
        "http" => CURL_HTTP,
        "https" => CURL_HTTPS,
        _ => return None,
    })
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn type_error(path: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{path}', expected: {expected}"
    ))
}

/// Validate (and, in keyval mode, convert in place) the members of an object.
pub fn check_object(
    obj: &mut Map<String, Value>,
    members: &[Member],
    prefix: &str,
    keyval: bool,
) -> QmpResult<()> {
    check_members(obj, members, prefix, keyval)?;
    check_unexpected(obj, &[members], prefix)
}

fn check_members(
    obj: &mut Map<String, Value>,
    members: &[Member],
    prefix: &str,
    keyval: bool,
) -> QmpResult<()> {
    for m in members {
        let path = join(prefix, m.name);
        match obj.get_mut(m.name) {
            None if m.optional => {}
            None => return Err(QmpError::generic(format!("Parameter '{path}' is missing"))),
            Some(v) => check_value(v, &m.ty, &path, keyval)?,
        }
    }
    Ok(())
}

fn check_unexpected(
    obj: &Map<String, Value>,
    member_sets: &[&[Member]],
    prefix: &str,
) -> QmpResult<()> {
    for k in obj.keys() {
        if !member_sets.iter().any(|ms| ms.iter().any(|m| m.name == k)) {
            return Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                join(prefix, k)
            )));
        }
    }
    Ok(())
}

/// Validate one value against a type.
pub fn check_value(v: &mut Value, ty: &Ty, path: &str, keyval: bool) -> QmpResult<()> {
    match ty {
        Ty::Any => Ok(()),
        Ty::Str => match v {
            Value::String(_) => Ok(()),
            _ => Err(type_error(path, "string")),
        },
        Ty::Int => {
            if keyval {
                if let Value::String(s) = v {
                    let parsed = parse_keyval_int(s).ok_or_else(|| type_error(path, "integer"))?;
                    *v = Value::Number(parsed.into());
                    return Ok(());
                }
            }
            match v {
                Value::Number(n) if n.as_i64().is_some() => Ok(()),
                _ => Err(type_error(path, "integer")),
            }
        }
        Ty::U32 => {
            if keyval {
                if let Value::String(t) = v {
                    let parsed = parse_keyval_int(t).ok_or_else(|| type_error(path, "integer"))?;
                    *v = Value::Number(parsed.into());
                }
            }
            // QEMU's uint visitor: anything but an integer "expects uint64"; integers (negative
            // ones wrap) outside the range "expect uint32_t".
            match v {
                Value::Number(n) if n.as_u64().is_some_and(|x| x <= u32::MAX as u64) => Ok(()),
                Value::Number(n) if n.is_i64() || n.is_u64() => Err(QmpError::generic(format!(
                    "Parameter '{path}' expects uint32_t"
                ))),
                _ => Err(QmpError::generic(format!(
                    "Parameter '{path}' expects uint64"
                ))),
            }
        }
        Ty::Union(u) => match v {
            Value::Object(o) => check_union(o, u, path, keyval),
            _ => Err(type_error(path, "object")),
        },
        Ty::Bool => {
            if keyval {
                if let Value::String(s) = v {
                    let b = match s.as_str() {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => return Err(type_error(path, "boolean")),
                    };
                    *v = Value::Bool(b);
                    return Ok(());
                }
            }
            match v {
                Value::Bool(_) => Ok(()),
                _ => Err(type_error(path, "boolean")),
            }
        }
        Ty::Enum(values) => match v {
            Value::String(s) if values.contains(&s.as_str()) => Ok(()),
            Value::String(s) => Err(QmpError::generic(format!(
                "Parameter '{path}' does not accept value '{s}'"
            ))),
            _ => Err(type_error(path, "string")),
        },
        Ty::Obj(members) => match v {
            Value::Object(o) => check_object(o, members, path, keyval),
            _ => Err(type_error(path, "object")),
        },
        Ty::List(inner) => {
            if keyval {
                if let Value::Object(o) = v {
                    // keyval lists arrive as {"0": .., "1": ..}
                    let mut items: Vec<(usize, Value)> = Vec::new();
                    for (k, e) in std::mem::take(o) {
                        let i = k.parse::<usize>().map_err(|_| type_error(path, "array"))?;
                        items.push((i, e));
                    }
                    items.sort_by_key(|(i, _)| *i);
                    *v = Value::Array(items.into_iter().map(|(_, e)| e).collect());
                }
            }
            match v {
                Value::Array(a) => {
                    for (i, e) in a.iter_mut().enumerate() {
                        check_value(e, inner, &format!("{path}[{i}]"), keyval)?;
                    }
                    Ok(())
                }
                _ => Err(type_error(path, "array")),
            }
        }
        Ty::BlockdevRef | Ty::BlockdevRefOrNull => match v {
            Value::Object(o) => check_blockdev_options(o, path, keyval),
            Value::String(_) => Ok(()),
            Value::Null if matches!(ty, Ty::BlockdevRefOrNull) => Ok(()),
            _ => Err(type_error(
                path,
                if matches!(ty, Ty::BlockdevRef) {
                    "BlockdevRef"
                } else {
                    "BlockdevRefOrNull"
                },
            )),
        },
    }
}

/// Validate a flat union: the base members in order, then the variant's, then leftovers.
pub fn check_union(
    obj: &mut Map<String, Value>,
    u: &Union,
    prefix: &str,
    keyval: bool,
) -> QmpResult<()> {
    check_members(obj, u.base, prefix, keyval).map_err(|e| {
        // QEMU names a bad discriminator value without the path of the union.
        let bad_tag = format!("Parameter '{}' does not accept", join(prefix, u.tag));
        match e.desc.strip_prefix(&bad_tag) {
            Some(rest) => QmpError::generic(format!("Parameter '{}' does not accept{rest}", u.tag)),
            None => e,
        }
    })?;
    let tag = obj
        .get(u.tag)
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_string();
    let variant = u
        .variants
        .iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, m)| *m)
        .unwrap_or(&[]);
    check_members(obj, variant, prefix, keyval)?;
    check_unexpected(obj, &[u.base, variant], prefix)
}

fn parse_keyval_int(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x") {
        return i64::from_str_radix(h, 16).ok();
    }
    // Size suffixes as QEMU's keyval accepts for size members.
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: i64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'b' => 1,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<i64>().ok()?.checked_mul(mult)
}

/// Validate `BlockdevOptions` (a union on `driver`): base members, then the driver's.
pub fn check_blockdev_options(
    obj: &mut Map<String, Value>,
    prefix: &str,
    keyval: bool,
) -> QmpResult<()> {
    check_members(obj, BLOCKDEV_BASE, prefix, keyval)?;
    let driver = obj
        .get("driver")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string();
    match driver_members(&driver) {
        Some(ms) => {
            check_members(obj, ms, prefix, keyval)?;
            check_unexpected(obj, &[BLOCKDEV_BASE, ms], prefix)
        }
        None => Err(QmpError::generic(format!(
            "Driver '{driver}' is not supported by diskstream (supported: file, raw, qcow2, nbd, http, https, blkdebug, copy-on-read)"
        ))),
    }
}

/// Convert QEMU's dotted key=value syntax (`driver=qcow2,file.driver=file,file.filename=a`)
/// into a JSON object of strings; `,,` is a literal comma.
pub fn parse_keyval(s: &str) -> Result<Map<String, Value>, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut key = String::new();
    let mut val = String::new();
    let mut in_val = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if in_val {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    val.push(',');
                } else {
                    pairs.push((std::mem::take(&mut key), std::mem::take(&mut val)));
                    in_val = false;
                }
            } else {
                val.push(c);
            }
        } else if c == '=' {
            in_val = true;
        } else if c == ',' {
            return Err(format!("Expected '=' after parameter '{key}'"));
        } else {
            key.push(c);
        }
    }
    if in_val {
        pairs.push((key, val));
    } else if !key.is_empty() {
        return Err(format!("Expected '=' after parameter '{key}'"));
    }
    let mut root = Map::new();
    for (k, v) in pairs {
        if k.is_empty() {
            return Err("Invalid parameter ''".to_string());
        }
        let parts: Vec<&str> = k.split('.').collect();
        let mut cur = &mut root;
        for (i, p) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                if cur.contains_key(*p) {
                    return Err(format!("Parameter '{k}' is set twice"));
                }
                cur.insert(p.to_string(), Value::String(v.clone()));
            } else {
                let e = cur
                    .entry(p.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                cur = match e {
                    Value::Object(o) => o,
                    _ => return Err(format!("Parameter '{k}' conflicts with a value")),
                };
            }
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(mut v: Value, members: &[Member]) -> String {
        let o = v.as_object_mut().expect("object");
        check_object(o, members, "", false)
            .err()
            .map(|e| e.desc)
            .unwrap_or_default()
    }

    const STREAMISH: &[Member] = &[
        req("device", Ty::Str),
        opt("speed", Ty::Int),
        opt("on-error", ON_ERROR),
    ];

    #[test]
    fn qapi_texts() {
        assert_eq!(
            err(json!({"bogus": 1}), STREAMISH),
            "Parameter 'device' is missing"
        );
        assert_eq!(
            err(json!({"device": 5}), STREAMISH),
            "Invalid parameter type for 'device', expected: string"
        );
        assert_eq!(
            err(json!({"device": "x", "speed": 1.5}), STREAMISH),
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            err(json!({"device": "x", "on-error": "bogus"}), STREAMISH),
            "Parameter 'on-error' does not accept value 'bogus'"
        );
        assert_eq!(
            err(json!({"device": "x", "bogus": 1}), STREAMISH),
            "Parameter 'bogus' is unexpected"
        );
        let mut v = json!({"driver": "qcow2", "node-name": "a", "file": {"driver": "file"}});
        let e = check_blockdev_options(v.as_object_mut().expect("o"), "", false);
        assert_eq!(
            e.err().map(|e| e.desc).unwrap_or_default(),
            "Parameter 'file.filename' is missing"
        );
    }

    #[test]
    fn keyval() {
        let mut o = parse_keyval(
            "driver=qcow2,node-name=top,file.driver=file,file.filename=a,,b.qcow2,read-only=on",
        )
        .expect("parse");
        assert_eq!(o["file"]["filename"], json!("a,b.qcow2"));
        check_blockdev_options(&mut o, "", true).expect("valid");
        assert_eq!(o["read-only"], json!(true));
    }
}
