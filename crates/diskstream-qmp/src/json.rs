//! QMP's JSON dialect: a streaming parser and QEMU's output format.
//!
//! Input is a byte stream, not lines: objects may be concatenated (`{..}{..}`) or split across
//! reads, strings may use single quotes (a QEMU extension), and a syntax error is reported
//! once per malformed value, after which parsing resumes with the next token, so one bad
//! request never kills the connection. Tokens are grouped into top-level values by counting
//! braces and brackets (as QEMU's json-streamer does) and only then parsed, which is what makes
//! the error messages ("JSON parse error, expecting value", "... missing : in object pair",
//! "... duplicate key", "... stray '@'") and the recovery points match QEMU's.
//!
//! Output is QEMU's: ASCII only (everything else as `\uXXXX` with upper-case hex, astral
//! characters as surrogate pairs), `", "` and `": "` separators, integral numbers without a
//! fraction and other numbers like C's `%.17g`.

use serde_json::{Map, Number, Value};

/// Longest token accepted (QEMU: 64 MiB).
const MAX_TOKEN: usize = 64 << 20;
/// Most tokens in one top-level value (QEMU: 2 Mi).
const MAX_TOKENS: usize = 2 << 20;
/// Deepest nesting (QEMU: 1024).
const MAX_DEPTH: usize = 1024;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    /// A string literal, raw (including its quotes).
    Str(Vec<u8>),
    /// A number literal.
    Num(String),
    /// A bare word (true, false, null, or garbage).
    Word(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LexState {
    Start,
    Str { quote: u8, escape: bool },
    Num,
    Word,
}

/// An incremental QMP JSON parser: feed bytes, collect complete values or errors.
pub struct JsonStream {
    state: LexState,
    tok: Vec<u8>,
    tokens: Vec<Tok>,
    depth: i64,
    too_big: bool,
}

impl Default for JsonStream {
    fn default() -> Self {
        JsonStream::new()
    }
}

/// The outcome of one top-level value: a JSON value or QEMU's error text.
pub type Parsed = Result<Value, String>;

impl JsonStream {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        JsonStream {
            state: LexState::Start,
            tok: Vec::new(),
            tokens: Vec::new(),
            depth: 0,
            too_big: false,
        }
    }

    /// Feed bytes; returns every top-level value completed by them, in order.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        for &b in data {
            self.byte(b, &mut out);
        }
        out
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Parsed>) {
        match self.state {
            LexState::Str { quote, escape } => {
                if b < 0x20 {
                    // Raw control characters are not allowed in strings.
                    self.tok.push(b);
                    self.lex_error(out);
                    return;
                }
                self.tok.push(b);
                if self.tok.len() > MAX_TOKEN {
                    self.too_big = true;
                }
                if escape {
                    self.state = LexState::Str {
                        quote,
                        escape: false,
                    };
                } else if b == b'\\' {
                    self.state = LexState::Str {
                        quote,
                        escape: true,
                    };
                } else if b == quote {
                    let t = std::mem::take(&mut self.tok);
                    self.state = LexState::Start;
                    self.token(Tok::Str(t), out);
                }
            }
            LexState::Num => {
                if b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-') {
                    self.tok.push(b);
                } else {
                    let t = String::from_utf8_lossy(&std::mem::take(&mut self.tok)).into_owned();
                    self.state = LexState::Start;
                    if valid_number(&t) {
                        self.token(Tok::Num(t), out);
                    } else {
                        self.tok = t.into_bytes();
                        self.tok.push(b);
                        self.lex_error(out);
                        return;
                    }
                    self.byte(b, out);
                }
            }
            LexState::Word => {
                if b.is_ascii_alphabetic() {
                    self.tok.push(b);
                } else {
                    let t = String::from_utf8_lossy(&std::mem::take(&mut self.tok)).into_owned();
                    self.state = LexState::Start;
                    self.token(Tok::Word(t), out);
                    self.byte(b, out);
                }
            }
            LexState::Start => match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'{' => self.token(Tok::LCurly, out),
                b'}' => self.token(Tok::RCurly, out),
                b'[' => self.token(Tok::LSquare, out),
                b']' => self.token(Tok::RSquare, out),
                b':' => self.token(Tok::Colon, out),
                b',' => self.token(Tok::Comma, out),
                b'"' | b'\'' => {
                    self.tok = vec![b];
                    self.state = LexState::Str {
                        quote: b,
                        escape: false,
                    };
                }
                b'-' | b'0'..=b'9' => {
                    self.tok = vec![b];
                    self.state = LexState::Num;
                }
                b'a'..=b'z' | b'A'..=b'Z' => {
                    self.tok = vec![b];
                    self.state = LexState::Word;
                }
                _ => {
                    self.tok = vec![b];
                    self.lex_error(out);
                }
            },
        }
    }

    fn lex_error(&mut self, out: &mut Vec<Parsed>) {
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.tok)).into_owned();
        self.state = LexState::Start;
        self.tokens.clear();
        self.depth = 0;
        self.too_big = false;
        out.push(Err(format!("JSON parse error, stray '{text}'")));
    }

    fn token(&mut self, t: Tok, out: &mut Vec<Parsed>) {
        match t {
            Tok::LCurly | Tok::LSquare => self.depth += 1,
            Tok::RCurly | Tok::RSquare => self.depth -= 1,
            _ => {}
        }
        self.tokens.push(t);
        if self.tokens.len() > MAX_TOKENS {
            self.too_big = true;
        }
        if self.depth > 0 && !self.too_big {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        self.depth = 0;
        if std::mem::take(&mut self.too_big) {
            out.push(Err("JSON parse error, token too large".to_string()));
            return;
        }
        out.push(parse_tokens(&tokens));
    }
}

fn valid_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && b[i] == b'-' {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == int_start || (b[int_start] == b'0' && i - int_start > 1) {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    i == b.len()
}

struct Parser<'a> {
    toks: &'a [Tok],
    pos: usize,
}

fn parse_tokens(toks: &[Tok]) -> Parsed {
    let mut p = Parser { toks, pos: 0 };
    let v = p.value(0).map_err(|e| format!("JSON parse error, {e}"))?;
    if p.pos != toks.len() {
        return Err("JSON parse error, expecting value".to_string());
    }
    Ok(v)
}

impl Parser<'_> {
    fn next(&mut self) -> Option<&Tok> {
        let t = self.toks.get(self.pos);
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("too many nested levels".to_string());
        }
        match self.next().cloned() {
            Some(Tok::LCurly) => self.object(depth),
            Some(Tok::LSquare) => self.array(depth),
            Some(Tok::Str(raw)) => Ok(Value::String(unescape(&raw)?)),
            Some(Tok::Num(n)) => Ok(number(&n)),
            Some(Tok::Word(w)) => match w.as_str() {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                "null" => Ok(Value::Null),
                _ => Err(format!("invalid keyword '{w}'")),
            },
            _ => Err("expecting value".to_string()),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, String> {
        let mut map = Map::new();
        if self.toks.get(self.pos) == Some(&Tok::RCurly) {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let key = match self.value(depth + 1)? {
                Value::String(s) => s,
                _ => return Err("key is not a string in object".to_string()),
            };
            if self.next() != Some(&Tok::Colon) {
                return Err("missing : in object pair".to_string());
            }
            let v = self.value(depth + 1)?;
            if map.contains_key(&key) {
                return Err("duplicate key".to_string());
            }
            map.insert(key, v);
            match self.next() {
                Some(Tok::Comma) => {}
                Some(Tok::RCurly) => return Ok(Value::Object(map)),
                _ => return Err("expected separator in dict".to_string()),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, String> {
        let mut v = Vec::new();
        if self.toks.get(self.pos) == Some(&Tok::RSquare) {
            self.pos += 1;
            return Ok(Value::Array(v));
        }
        loop {
            v.push(self.value(depth + 1)?);
            match self.next() {
                Some(Tok::Comma) => {}
                Some(Tok::RSquare) => return Ok(Value::Array(v)),
                _ => return Err("expected separator in list".to_string()),
            }
        }
    }
}

fn number(s: &str) -> Value {
    if !s.contains(['.', 'e', 'E']) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = s.parse::<u64>() {
            return Value::Number(u.into());
        }
    }
    let f: f64 = s.parse().unwrap_or(f64::NAN);
    if f == 0.0 {
        // QEMU prints -0 and 0.0 as 0.
        return Value::Number(0.into());
    }
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn unescape(raw: &[u8]) -> Result<String, String> {
    let inner = &raw[1..raw.len().saturating_sub(1).max(1)];
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let e = inner.get(i + 1).copied();
        i += 2;
        let c = match e {
            Some(b'"') => '"',
            Some(b'\'') => '\'',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let hi = hex4(inner, i)?;
                i += 4;
                let cp = if (0xD800..0xDC00).contains(&hi) {
                    if inner.get(i) == Some(&b'\\') && inner.get(i + 1) == Some(&b'u') {
                        let lo = hex4(inner, i + 2)?;
                        if !(0xDC00..0xE000).contains(&lo) {
                            return Err("missing low surrogate in string".to_string());
                        }
                        i += 6;
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    } else {
                        return Err("missing low surrogate in string".to_string());
                    }
                } else if (0xDC00..0xE000).contains(&hi) {
                    return Err("stray low surrogate in string".to_string());
                } else if hi == 0 {
                    return Err("null character in string".to_string());
                } else {
                    hi
                };
                char::from_u32(cp).ok_or_else(|| "invalid \\u escape in string".to_string())?
            }
            _ => return Err("invalid escape sequence in string".to_string()),
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    String::from_utf8(out).map_err(|_| "invalid UTF-8 sequence in string".to_string())
}

fn hex4(b: &[u8], i: usize) -> Result<u32, String> {
    let s = b
        .get(i..i + 4)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| "invalid hex escape sequence in string".to_string())?;
    u32::from_str_radix(s, 16).map_err(|_| "invalid hex escape sequence in string".to_string())
}

/// Serialise `v` the way QEMU's monitor does (no trailing newline).
pub fn to_qemu_json(v: &Value) -> String {
    let mut s = String::new();
    write_value(&mut s, v);
    s
}

/// Serialise an object whose members come in the given order (QEMU's own key order for the
/// reply envelope and events).
pub fn ordered_object(members: &[(&str, &Value)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        write_string(&mut s, k);
        s.push_str(": ");
        write_value(&mut s, v);
    }
    s.push('}');
    s
}

fn write_value(s: &mut String, v: &Value) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                s.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                s.push_str(&u.to_string());
            } else if let Some(f) = n.as_f64() {
                s.push_str(&format_g17(f));
            }
        }
        Value::String(t) => write_string(s, t),
        Value::Array(a) => {
            s.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                write_value(s, e);
            }
            s.push(']');
        }
        Value::Object(m) => {
            s.push('{');
            for (i, (k, e)) in m.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                write_string(s, k);
                s.push_str(": ");
                write_value(s, e);
            }
            s.push('}');
        }
    }
}

fn write_string(s: &mut String, t: &str) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    s.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// C's `%.17g`.
fn format_g17(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let e = format!("{:.16e}", f);
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    if (-4..17).contains(&x) {
        let prec = (16 - x).max(0) as usize;
        let mut t = format!("{:.*}", prec, f);
        if t.contains('.') {
            while t.ends_with('0') {
                t.pop();
            }
            if t.ends_with('.') {
                t.pop();
            }
        }
        t
    } else {
        let mut m = mant.to_string();
        if m.contains('.') {
            while m.ends_with('0') {
                m.pop();
            }
            if m.ends_with('.') {
                m.pop();
            }
        }
        format!("{m}e{}{:02}", if x < 0 { '-' } else { '+' }, x.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all(input: &str) -> Vec<Parsed> {
        JsonStream::new().feed(input.as_bytes())
    }

    #[test]
    fn concatenated_and_split_objects() {
        let mut p = JsonStream::new();
        assert!(p.feed(b"{\"a\": ").is_empty());
        let r = p.feed(b"1}{'b': 'x'}");
        assert_eq!(r, vec![Ok(json!({"a": 1})), Ok(json!({"b": "x"}))]);
    }

    #[test]
    fn qemu_error_texts() {
        assert_eq!(
            all("{ \"execute\": }\n"),
            vec![Err("JSON parse error, expecting value".to_string())]
        );
        assert_eq!(
            all("{\"execute\" \"x\"}"),
            vec![Err("JSON parse error, missing : in object pair".to_string())]
        );
        assert_eq!(
            all("{\"a\": 1, \"a\": 2}"),
            vec![Err("JSON parse error, duplicate key".to_string())]
        );
        assert_eq!(
            all("@"),
            vec![Err("JSON parse error, stray '@'".to_string())]
        );
        assert_eq!(
            all("{\"a\": tru}"),
            vec![Err("JSON parse error, invalid keyword 'tru'".to_string())]
        );
        assert_eq!(
            all("}"),
            vec![Err("JSON parse error, expecting value".to_string())]
        );
        assert_eq!(
            all("{\"a\": \"a\\qb\"}"),
            vec![Err(
                "JSON parse error, invalid escape sequence in string".to_string()
            )]
        );
    }

    #[test]
    fn recovers_after_errors() {
        let r = all("{ \"execute\": }\n{\"execute\": \"x\"}");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1], Ok(json!({"execute": "x"})));
    }

    #[test]
    fn output_is_qemu_style() {
        let v = json!({"id": "\u{e9}\u{1F600}a/b\u{1}\t\u{7f}"});
        assert_eq!(
            to_qemu_json(&v),
            "{\"id\": \"\\u00E9\\uD83D\\uDE00a/b\\u0001\\t\\u007F\"}"
        );
        assert_eq!(
            to_qemu_json(&all("[1.5e3, -0, 0.1]")[0].clone().unwrap_or_default()),
            "[1500, 0, 0.10000000000000001]"
        );
        assert_eq!(
            to_qemu_json(&all("12345678901234567890\n")[0].clone().unwrap_or_default()),
            "12345678901234567890"
        );
    }
}
