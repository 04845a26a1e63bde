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

/// Human-readable size as qemu-img prints it ("6 MiB", "1.5 GiB", "977 KiB"): QEMU's
/// `size_to_str`, i.e. the unit switches once the number would reach 1000, printed with C's
/// `%0.3g`.
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp's exponent of v * 1024 / 1000, minus one, is floor(log2(...)).
    let x = v as f64 / (1000.0 / 1024.0);
    let exp = if x == 0.0 {
        0
    } else {
        x.log2().floor() as i64 + 1
    };
    let i = ((exp - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", c_g3(v as f64 / div), UNITS[i])
}

/// C's `%0.3g`.
fn c_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{v:.2e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", trim(mant), exp.abs());
    }
    trim(&format!("{:.*}", (2 - exp) as usize, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").expect("valid size"), 1 << 30);
        assert_eq!(parse_size("64k").expect("valid size"), 65536);
        assert_eq!(parse_size("512").expect("valid size"), 512);
        assert_eq!(parse_size("1.5M").expect("valid size"), 3 << 19);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999E").is_err());
    }

    #[test]
    fn kv_lists() {
        let v = parse_kv(&["a=1,b=x,,y".into(), "c".into()]).expect("valid list");
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
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(1_114_112), "1.06 MiB");
        assert_eq!(human_size(12800), "12.5 KiB");
        assert_eq!(human_size(1000448), "977 KiB");
        assert_eq!(human_size(1_023_693), "1e+03 KiB");
    }
}
