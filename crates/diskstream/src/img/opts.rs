//! qemu-img style argument helpers: sizes with suffixes and `-o key=value,...` lists.

use anyhow::{bail, Result};

/// Parse a size such as `1G`, `64k`, `512`, `1.5M` (binary suffixes, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    if s.is_empty() {
        bail!("Invalid image size specified: empty");
    }
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => bail!("Invalid image size specified: '{s}'"),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    if let Ok(v) = num.parse::<u64>() {
        return v
            .checked_mul(mult)
            .ok_or_else(|| anyhow::anyhow!("Image size '{s}' is too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("Invalid image size specified: '{s}'"))?;
    if f.is_nan() || f < 0.0 || f * mult as f64 >= u64::MAX as f64 {
        bail!("Invalid image size specified: '{s}'");
    }
    Ok((f * mult as f64) as u64)
}

/// Split `-o` option lists: `a=1,b=x,,y` (a doubled comma is a literal comma). Several `-o`
/// arguments are concatenated.
pub fn parse_kv(lists: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for list in lists {
        let mut cur = String::new();
        let mut items = Vec::new();
        let mut chars = list.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for it in items {
            if it.is_empty() {
                continue;
            }
            match it.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => out.push((it, "on".to_string())),
            }
        }
    }
    Ok(out)
}

/// Parse an on/off style boolean option.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}

/// Human-readable size as qemu-img prints it ("6 MiB", "1.5 GiB").
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut f = v as f64;
    let mut i = 0;
    while f >= 1024.0 && i < UNITS.len() - 1 {
        f /= 1024.0;
        i += 1;
    }
    if i == 0 {
        return format!("{v} B");
    }
    let s = format!("{f:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999E").is_err());
    }

    #[test]
    fn kv_lists() {
        let v = parse_kv(&["a=1,b=x,,y".into(), "c".into()]).unwrap();
        assert_eq!(
            v,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "on".into())
            ]
        );
    }

    #[test]
    fn human() {
        assert_eq!(human_size(6291456), "6 MiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(335872), "328 KiB");
    }
}
