//! File diagnostics: every configuration problem is reported as `file:line:column: message`,
//! because operators fix files under stress and must land on the right character at once.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a file, with the position an editor can jump to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// The file as the operator named it (not canonicalised: ConfigMap paths stay readable).
    pub path: PathBuf,
    /// 1-based line; 0 when the problem is about the whole file (unreadable, missing).
    pub line: usize,
    /// 1-based column in characters.
    pub column: usize,
    /// What is wrong, phrased so the fix is obvious.
    pub message: String,
}

impl FileError {
    /// A problem located at a byte offset of `text`.
    pub fn at(path: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = line_col(text, offset);
        FileError {
            path: path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    /// A problem about the file as a whole (cannot be read, missing).
    pub fn whole(path: &Path, message: impl Into<String>) -> Self {
        FileError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// Turns a `toml` parse or deserialisation error into a located one.
    pub fn from_toml(path: &Path, text: &str, err: &toml::de::Error) -> Self {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        // toml's message is multi-line with a caret drawing; keep its first line only.
        let message = err
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .trim();
        FileError::at(path, text, offset, message.to_string())
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found in one file (or a pair of files), reported together so one edit fixes all.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileErrors(pub Vec<FileError>);

impl FileErrors {
    /// True when nothing was found wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FileErrors {}

impl From<FileError> for FileErrors {
    fn from(e: FileError) -> Self {
        FileErrors(vec![e])
    }
}

/// 1-based (line, column) of a byte offset; columns count characters, not bytes.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let text = "a = 1\nbb = \"é2\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(text, 6 + 6 + 2), (2, 8));
        assert_eq!(line_col(text, 10_000), (3, 1));
    }

    #[test]
    fn display_has_file_line_column() {
        let e = FileError::at(Path::new("rules.toml"), "x\ny", 2, "bad");
        assert_eq!(e.to_string(), "rules.toml:2:1: bad");
        let w = FileError::whole(Path::new("r.toml"), "cannot read");
        assert_eq!(w.to_string(), "r.toml: cannot read");
    }
}
