//! Progress of the long commands (`demo`, `replay`, `gen-workload`, `inspect`).
//!
//! On a terminal an operator wants a live bar (`indicatif`); in a CI log, a pipe or a file,
//! redrawn bars are noise, so the same reports become a plain line at most once a second and
//! one at the end. Either way progress goes to stderr, so a command's report on stdout (the
//! JSON of `replay` or `inspect --json`) stays parseable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shortest time between two plain lines.
const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// Where progress goes: a bar on a terminal, or plain lines.
enum Sink {
    Bar(ProgressBar),
    Lines {
        out: Box<dyn Write + Send>,
        /// When the last line was written, and what it said.
        last: Option<(Instant, String)>,
    },
}

/// The progress of one command: `position` out of an optional `total` of `unit`s.
pub struct Progress {
    sink: Sink,
    label: String,
    unit: &'static str,
    position: u64,
    total: Option<u64>,
    message: String,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("label", &self.label)
            .field("position", &self.position)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// Progress of `label` in `unit`s (`"spans"`, `"keys"`) on stderr: a bar when stderr is
    /// a terminal, plain lines otherwise.
    pub fn stderr(label: &str, unit: &'static str, total: Option<u64>) -> Self {
        if std::io::stderr().is_terminal() {
            Self::bar(label, unit, total, ProgressDrawTarget::stderr())
        } else {
            Self::lines(label, unit, total, Box::new(std::io::stderr()))
        }
    }

    /// Plain lines written to `out`.
    pub fn lines(
        label: &str,
        unit: &'static str,
        total: Option<u64>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self::with_sink(Sink::Lines { out, last: None }, label, unit, total)
    }

    /// A bar drawn to `target`.
    fn bar(
        label: &str,
        unit: &'static str,
        total: Option<u64>,
        target: ProgressDrawTarget,
    ) -> Self {
        let bar = ProgressBar::with_draw_target(total, target);
        let template = match total {
            Some(_) => format!(
                "{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{human_pos}}/{{human_len}} {unit} \
                 ({{per_sec}}, eta {{eta}}) {{msg}}"
            ),
            None => format!(
                "{{prefix}} [{{elapsed_precise}}] {{spinner}} {{human_pos}} {unit} ({{per_sec}}) {{msg}}"
            ),
        };
        // The templates are fixed; a bad one would only lose the styling.
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self::with_sink(Sink::Bar(bar), label, unit, total)
    }

    fn with_sink(sink: Sink, label: &str, unit: &'static str, total: Option<u64>) -> Self {
        Self {
            sink,
            label: label.to_owned(),
            unit,
            position: 0,
            total,
            message: String::new(),
        }
    }

    /// Sets how many units there are in all.
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        if let Sink::Bar(bar) = &self.sink {
            bar.set_length(total);
        }
    }

    /// Sets how many units are done.
    pub fn set_position(&mut self, position: u64) {
        self.position = position;
        match &mut self.sink {
            Sink::Bar(bar) => bar.set_position(position),
            Sink::Lines { .. } => self.line(false),
        }
    }

    /// Shows `message` beside the count (a phase, a rate).
    pub fn set_message(&mut self, message: impl Into<String>) {
        self.message = message.into();
        match &mut self.sink {
            Sink::Bar(bar) => bar.set_message(self.message.clone()),
            Sink::Lines { .. } => self.line(false),
        }
    }

    /// Ends the display; a plain sink writes its last line.
    pub fn finish(&mut self) {
        match &mut self.sink {
            Sink::Bar(bar) => bar.finish_and_clear(),
            Sink::Lines { .. } => self.line(true),
        }
    }

    /// Writes a plain line, unless one was written less than [`LINE_INTERVAL`] ago and
    /// `force` is false.
    fn line(&mut self, force: bool) {
        let text = self.text();
        let Sink::Lines { out, last } = &mut self.sink else {
            return;
        };
        if let Some((at, said)) = last.as_ref()
            && (*said == text || (!force && at.elapsed() < LINE_INTERVAL))
        {
            return;
        }
        // Progress is a courtesy: a closed stderr must not fail the command.
        let _ = writeln!(out, "{text}");
        *last = Some((Instant::now(), text));
    }

    fn text(&self) -> String {
        let mut text = match self.total {
            Some(total) => format!("{}: {}/{total} {}", self.label, self.position, self.unit),
            None => format!("{}: {} {}", self.label, self.position, self.unit),
        };
        if !self.message.is_empty() {
            text.push_str(", ");
            text.push_str(&self.message);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn without_a_terminal_progress_is_a_few_plain_lines() {
        let out = Shared::default();
        let mut progress = Progress::lines("replay", "spans", Some(1000), Box::new(out.clone()));

        for position in 1..=1000 {
            progress.set_position(position);
        }
        progress.set_message("flushing");
        progress.finish();

        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"replay: 1/1000 spans"), "{text}");
        assert_eq!(
            lines.last(),
            Some(&"replay: 1000/1000 spans, flushing"),
            "{text}"
        );
        assert!(lines.len() < 10, "throttled to one a second: {text}");
        assert!(!text.contains('\u{1b}'), "no terminal escapes: {text:?}");
    }

    #[test]
    fn a_bar_counts_what_it_is_told() {
        let mut progress = Progress::bar("inspect", "keys", None, ProgressDrawTarget::hidden());
        progress.set_total(10);
        progress.set_position(4);

        let Sink::Bar(bar) = &progress.sink else {
            panic!("not a bar");
        };
        assert_eq!((bar.position(), bar.length()), (4, Some(10)));
        progress.finish();
    }
}
