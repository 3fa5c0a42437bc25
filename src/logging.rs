//! How fwgate writes its logs: one line per event, as text or JSON.
//!
//! Text lines carry operator input (a kill-switch `reason`, a rules file path) and wire input
//! (a device id, a raw version, a path). Written raw, a `\n` in any of them would forge a whole
//! log line (an "entry removed" audit line, say), and an ESC would drive the reader's terminal.
//! So the text format's field formatter, [`EscapedFields`], escapes every control character
//! (C0, DEL and C1: `\n`, `\r`, `\t`, else `\u{..}`) in every field, whether it was recorded
//! with `%` (Display), `?` (Debug) or as a string; in one place, not at each log call. JSON lines
//! are escaped by the JSON encoder already.
//!
//! Floats are written with at most three decimals (`backend_ms=1.707`, not
//! `1.7072800000000001`); colour codes are written only when standard output is a terminal.

use std::fmt::{self, Write as _};
use std::io::IsTerminal as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

use crate::config::LogFormat;

/// Installs the process-wide subscriber: `RUST_LOG` (default `info`) filters, `format` chooses
/// text or JSON. Colours only on a terminal.
pub fn install(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.fmt_fields(EscapedFields).init(),
    }
}

/// The text format's field formatter: `message` first as written, then `name=value` pairs,
/// strings quoted; control characters escaped everywhere, floats rounded to three decimals.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> MakeVisitor<Writer<'w>> for EscapedFields {
    type Visitor = EscapingVisitor<'w>;

    fn make_visitor(&self, writer: Writer<'w>) -> EscapingVisitor<'w> {
        EscapingVisitor {
            writer,
            empty: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's fields for [`EscapedFields`].
pub struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    /// Writes the separator and `name=` (nothing for `message`); false when already failed.
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        if !self.empty {
            self.result = self.writer.write_char(' ');
        }
        self.empty = false;
        let name = field.name();
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| write!(Escaping(&mut self.writer), "{name}="));
        }
        self.result.is_ok()
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.start(field) {
            self.result = write_float(&mut self.writer, value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            Escaping(&mut self.writer).write_str(value)
        } else {
            // Debug quotes the string and escapes control characters itself.
            write!(self.writer, "{value:?}")
        };
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            // `%value` arrives here too, as Display through Debug: escaped on the way out.
            self.result = write!(Escaping(&mut self.writer), "{value:?}");
        }
    }
}

impl VisitOutput<fmt::Result> for EscapingVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapingVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// A writer that escapes control characters (`char::is_control`: C0, DEL, C1) as it writes.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// A float with at most three decimals, trailing zeros dropped (`1.707`, `30`, `0.5`).
fn write_float(out: &mut impl fmt::Write, value: f64) -> fmt::Result {
    if !value.is_finite() || value.abs() >= 1e15 {
        return write!(out, "{value}");
    }
    let mut buf = String::with_capacity(24);
    write!(buf, "{value:.3}")?;
    let trimmed = buf.trim_end_matches('0').trim_end_matches('.');
    out.write_str(if trimmed == "-0" { "0" } else { trimmed })
}

/// A duration in milliseconds rounded to the microsecond, for log fields: the JSON format
/// writes floats as they are, so they are rounded where they are made.
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A duration in seconds rounded to the millisecond, for log fields (see [`millis`]).
pub fn seconds(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Runs `f` with a text subscriber using [`EscapedFields`] and returns what it wrote.
    fn text_of(f: impl FnOnce()) -> String {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .with_writer(move || SinkWriter(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).unwrap()
    }

    struct SinkWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SinkWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn control_characters_in_any_field_stay_on_one_line() {
        let forged = "x\n2026-01-01T00:00:00Z  WARN fwgate::audit: kill-switch entry removed id=\"ks-1\"\r\u{1b}[2J\u{7f}\u{85}";
        let text = text_of(|| {
            tracing::warn!(target: "fwgate::audit", reason = %forged, by = forged, debug = ?forged, "added {}", forged);
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        for raw in ['\r', '\u{1b}', '\u{7f}', '\u{85}'] {
            assert!(!text.contains(raw), "{raw:?} written raw: {text:?}");
        }
        assert!(text.contains("reason=x\\n2026"), "{text}");
        assert!(text.contains("\\u{1b}[2J"), "{text}");
        assert!(text.contains("by=\"x\\n2026"), "{text}");
        assert!(text.contains("added x\\n2026"), "{text}");
    }

    #[test]
    fn floats_have_at_most_three_decimals() {
        let text = text_of(|| {
            tracing::info!(
                backend_ms = 1.707_280_000_000_000_1_f64,
                grace_s = 30.0_f64,
                half = 0.5_f64,
                tiny = -0.000_1_f64,
                "timing"
            );
        });
        assert!(
            text.contains("timing backend_ms=1.707 grace_s=30 half=0.5 tiny=0"),
            "{text}"
        );
        assert_eq!(millis(std::time::Duration::from_nanos(1_707_280)), 1.707);
        assert_eq!(seconds(std::time::Duration::from_micros(2_500_400)), 2.5);
    }

    #[test]
    fn plain_fields_read_as_before() {
        let text = text_of(|| tracing::info!(r#type = "a", n = 3, ok = true, "hello"));
        assert!(text.contains("hello type=\"a\" n=3 ok=true"), "{text}");
    }
}
