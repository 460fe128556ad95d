//! logwarden's compiled parse hot path (issue 18, item 5).
//!
//! The pure-Python `services.cores.parse.ParseCore` stays the reference: it reads headers,
//! masks, matches the catalog and mines with drain3. What it learns about a line's *shape* (the
//! line with every ASCII digit read as 0: same header spans, same key and parameter spans, same
//! template) it teaches this cache, and every later line of that shape is turned into its
//! events' JSON here, byte for byte what `msgspec.json.encode(ParsedEvent)` writes (tested in
//! tests/test_native.py). Anything this cache does not know (a new shape, a second of time not
//! seen yet, a file path whose keys it was not told, a float msgspec and ryu write differently,
//! a string that is not plain UTF-8) returns None, and the caller takes the Python path, which
//! teaches it. No regex runs here, so nothing here can disagree with Python's `re`.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use std::collections::HashMap;
use std::fmt::Write as _;

/// A header field: absent, cut from the line (its text holds digits), or the same text in every
/// line of the shape (pre-encoded as JSON).
enum Piece {
    Null,
    Slice(usize, usize),
    Text(String),
}

struct Shape {
    format: u32,
    ts: (usize, usize),
    frac: Option<(usize, usize)>,
    level: Piece,
    component: Piece,
    keys: Vec<(usize, usize)>,
    params: Vec<(usize, usize)>,
    /// `,"template_id":...,"template":...` as JSON
    template_json: String,
    slot: usize,
    cluster: i64,
}

/// Shapes, seconds and path keys the Python core taught, and the lines counted by template kind.
#[pyclass]
struct HotParse {
    shapes: HashMap<Vec<u8>, Shape>,
    capacity: usize,
    /// per header format: a header's time text (no fraction) -> epoch seconds
    times: Vec<HashMap<String, f64>>,
    paths: HashMap<String, Vec<String>>,
    path_keys: bool,
    counts: [u64; 3],
}

/// Seconds of header time kept per format (the Python header cache keeps 4096 too).
const TIMES: usize = 4096;

fn escape_into(out: &mut String, text: &str) {
    // msgspec's escaping: \" \\ \b \t \n \f \r, other controls as \u00xx, the rest (0x7f and
    // non-ASCII too) as they are
    out.push('"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            0x08 => Some("\\b"),
            b'\t' => Some("\\t"),
            b'\n' => Some("\\n"),
            0x0c => Some("\\f"),
            b'\r' => Some("\\r"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&text[start..i]);
        match esc {
            Some(s) => out.push_str(s),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

/// The float as msgspec writes it, where ryu writes it the same way (decimal notation); None
/// outside that range, so the caller falls back to msgspec.
fn float_into(out: &mut String, value: f64) -> bool {
    if !(value >= 1.0 && value < 1e15) {
        return false;
    }
    let mut buf = ryu::Buffer::new();
    out.push_str(buf.format_finite(value));
    true
}

fn list_into(out: &mut String, items: &[&str]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        escape_into(out, item);
    }
    out.push(']');
}

fn piece_into(out: &mut String, piece: &Piece, line: &str) {
    match piece {
        Piece::Null => out.push_str("null"),
        Piece::Slice(a, b) => escape_into(out, &line[*a..*b]),
        Piece::Text(json) => out.push_str(json),
    }
}

#[pymethods]
impl HotParse {
    #[new]
    fn new(capacity: usize, path_keys: bool) -> Self {
        HotParse {
            shapes: HashMap::new(),
            capacity: capacity.max(1),
            times: Vec::new(),
            paths: HashMap::new(),
            path_keys,
            counts: [0; 3],
        }
    }

    /// Teach a shape: spans are (start, end) character offsets in the line (the line is ASCII).
    #[pyo3(signature = (signature, format, ts, frac, level, level_text, component, component_text, keys, params, template_id, template, slot, cluster))]
    #[allow(clippy::too_many_arguments)]
    fn add_shape(
        &mut self,
        signature: &[u8],
        format: u32,
        ts: (usize, usize),
        frac: Option<(usize, usize)>,
        level: Option<(usize, usize)>,
        level_text: Option<&str>,
        component: Option<(usize, usize)>,
        component_text: Option<&str>,
        keys: Vec<(usize, usize)>,
        params: Vec<(usize, usize)>,
        template_id: &str,
        template: &str,
        slot: usize,
        cluster: i64,
    ) {
        if self.shapes.len() >= self.capacity {
            self.shapes.clear();
        }
        let piece = |span: Option<(usize, usize)>, text: Option<&str>| match (span, text) {
            (Some((a, b)), _) => Piece::Slice(a, b),
            (None, Some(t)) => {
                let mut json = String::new();
                escape_into(&mut json, t);
                Piece::Text(json)
            }
            (None, None) => Piece::Null,
        };
        let mut template_json = String::from(",\"template_id\":");
        escape_into(&mut template_json, template_id);
        template_json.push_str(",\"template\":");
        escape_into(&mut template_json, template);
        self.shapes.insert(
            signature.to_vec(),
            Shape {
                format,
                ts,
                frac,
                level: piece(level, level_text),
                component: piece(component, component_text),
                keys,
                params,
                template_json,
                slot: slot.min(2),
                cluster,
            },
        );
    }

    /// Teach the epoch seconds (no fraction) of a header time text of one header format.
    fn add_time(&mut self, format: u32, text: String, epoch: f64) {
        let format = format as usize;
        if self.times.len() <= format {
            self.times.resize_with(format + 1, HashMap::new);
        }
        let times = &mut self.times[format];
        if times.len() >= TIMES {
            times.clear();
        }
        times.insert(text, epoch);
    }

    /// Teach the session keys found in a file path.
    fn add_path(&mut self, path: String, keys: Vec<String>) {
        if self.paths.len() >= self.capacity {
            self.paths.clear();
        }
        self.paths.insert(path, keys);
    }

    /// Forget the shapes of a drain cluster whose template changed.
    fn drop_cluster(&mut self, cluster: i64) {
        self.shapes.retain(|_, s| s.cluster != cluster);
    }

    fn clear(&mut self) {
        self.shapes.clear();
        self.times.clear();
        self.paths.clear();
    }

    fn __len__(&self) -> usize {
        self.shapes.len()
    }

    /// Lines turned into events here, by template kind (known, mined, unknown).
    fn counts(&self) -> (u64, u64, u64) {
        (self.counts[0], self.counts[1], self.counts[2])
    }

    /// A line of a known shape -> (timestamp, [(ParsedEvent JSON, session key), ...]), one per
    /// session key; None when the Python path must take it.
    #[pyo3(signature = (line, host, topic, partition, offset, path, file_offset, kafka_ms))]
    #[allow(clippy::too_many_arguments)]
    fn events<'py>(
        &mut self,
        py: Python<'py>,
        line: &Bound<'py, PyString>,
        host: &Bound<'py, PyString>,
        topic: &Bound<'py, PyString>,
        partition: i64,
        offset: i64,
        path: &Bound<'py, PyString>,
        file_offset: i64,
        kafka_ms: i64,
    ) -> Option<(f64, Vec<(Bound<'py, PyBytes>, Bound<'py, PyString>)>)> {
        // lone surrogates (from JSON escapes) are not UTF-8: the Python path takes them
        let line = line.to_str().ok()?.trim_end_matches(['\r', '\n']);
        let (host, topic, path) = (host.to_str().ok()?, topic.to_str().ok()?, path.to_str().ok()?);
        if !line.is_ascii() {
            return None;
        }
        let signature: Vec<u8> = line.bytes().map(|b| if b.is_ascii_digit() { b'0' } else { b }).collect();
        let shape = self.shapes.get(&signature)?;
        let mut timestamp = *self.times.get(shape.format as usize)?.get(&line[shape.ts.0..shape.ts.1])?;
        if let Some((a, b)) = shape.frac {
            let digits = &line[a..b];
            let n: u64 = digits.parse().ok()?;
            if digits.len() > 15 || n >= (1u64 << 53) {
                return None;
            }
            timestamp += n as f64 / 10f64.powi(digits.len() as i32);
        }
        let mut keys: Vec<&str> = shape.keys.iter().map(|&(a, b)| &line[a..b]).collect();
        if self.path_keys {
            keys.extend(self.paths.get(path)?.iter().map(|k| k.as_str()));
        }
        if keys.len() > 1 {
            let mut unique: Vec<&str> = Vec::with_capacity(keys.len());
            for k in keys {
                if !unique.contains(&k) {
                    unique.push(k);
                }
            }
            keys = unique;
        }

        let mut tail = String::with_capacity(line.len() * 2 + 256);
        tail.push_str(",\"keys\":");
        list_into(&mut tail, &keys);
        tail.push_str(",\"timestamp\":");
        if !float_into(&mut tail, timestamp) {
            return None;
        }
        tail.push_str(",\"level\":");
        piece_into(&mut tail, &shape.level, line);
        tail.push_str(",\"component\":");
        piece_into(&mut tail, &shape.component, line);
        tail.push_str(&shape.template_json);
        tail.push_str(",\"params\":");
        let params: Vec<&str> = shape.params.iter().map(|&(a, b)| &line[a..b]).collect();
        list_into(&mut tail, &params);
        tail.push_str(",\"message\":");
        escape_into(&mut tail, line);
        tail.push_str(",\"source\":{\"host\":");
        escape_into(&mut tail, host);
        tail.push_str(",\"topic\":");
        escape_into(&mut tail, topic);
        let _ = write!(tail, ",\"partition\":{},\"offset\":{},\"log.file.path\":", partition, offset);
        escape_into(&mut tail, path);
        let _ = write!(tail, ",\"log.offset\":{},\"kafka_timestamp\":", file_offset);
        if kafka_ms > 0 {
            if !float_into(&mut tail, kafka_ms as f64 / 1000.0) {
                return None;
            }
        } else {
            tail.push_str("null");
        }
        tail.push_str("}}");

        // == records.stable_id(host, path, offset): sha1 of host NUL path NUL offset, 16 hex digits
        let mut id = sha1_smol::Sha1::new();
        id.update(host.as_bytes());
        id.update(b"\0");
        id.update(path.as_bytes());
        id.update(b"\0");
        id.update(file_offset.to_string().as_bytes());
        let digest = id.digest().to_string();
        let head = format!("{{\"event_id\":\"{}\",\"key\":", &digest[..16]);

        let slot = shape.slot;
        let mut out = Vec::with_capacity(keys.len().max(1));
        let mut one = |key: &str| {
            let mut value = String::with_capacity(head.len() + key.len() + tail.len() + 2);
            value.push_str(&head);
            escape_into(&mut value, key);
            value.push_str(&tail);
            out.push((PyBytes::new(py, value.as_bytes()), PyString::new(py, key)));
        };
        if keys.is_empty() {
            one(host);
        } else {
            for k in &keys {
                one(k);
            }
        }
        self.counts[slot] += 1;
        Some((timestamp, out))
    }
}

#[pymodule]
fn logwarden_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HotParse>()?;
    Ok(())
}
