//! `output_glob` patterns, with Arvados's semantics.
//!
//! A pattern is matched against a path relative to the output directory,
//! segment by segment. Within one segment `*` matches any run of
//! characters, `?` one character, and `[a-e]`, `[^a-e]` or `[!a-e]` one
//! character of (or not of) a set. A whole segment `**` matches any number
//! of directories: none as a leading `**/` or inner `/**/`, one or more as
//! a trailing `/**`, so `x/**` keeps what is inside a directory `x` and
//! never a plain file `x`. A pattern that matches a directory keeps all of
//! its contents.

/// A list of parsed patterns. An empty list keeps every file.
#[derive(Debug, Clone, Default)]
pub struct Globs {
    patterns: Vec<Vec<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid output_glob pattern {pattern:?}: {reason}")]
pub struct GlobError {
    pub pattern: String,
    pub reason: &'static str,
}

impl Globs {
    /// Parses the patterns, rejecting empty ones and unclosed `[`.
    pub fn parse(patterns: &[String]) -> Result<Globs, GlobError> {
        let mut parsed = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            let error = |reason| GlobError {
                pattern: pattern.clone(),
                reason,
            };
            let trimmed = pattern.trim_start_matches("./").trim_matches('/');
            if trimmed.is_empty() {
                return Err(error(
                    "it is empty: give a path such as `*.txt` or `dir/**`",
                ));
            }
            let segments: Vec<String> = trimmed.split('/').map(str::to_string).collect();
            for segment in &segments {
                if segment.is_empty() {
                    return Err(error("it contains an empty segment (`//`)"));
                }
                if segment != "**" && segment.contains("**") {
                    return Err(error("`**` must be a whole path segment"));
                }
                check_brackets(segment).map_err(error)?;
            }
            parsed.push(segments);
        }
        Ok(Globs { patterns: parsed })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Returns whether the file at `path` (relative, `/`-separated) is
    /// kept: a pattern matches it or one of the directories above it.
    pub fn keeps_file(&self, path: &str) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        let segments: Vec<&str> = path.split('/').collect();
        self.patterns.iter().any(|pattern| {
            (1..=segments.len()).any(|length| {
                let is_file = length == segments.len();
                match_segments(pattern, &segments[..length], is_file)
            })
        })
    }

    /// Returns whether a directory at `path` may contain a kept file, so
    /// directories that cannot are not walked.
    pub fn may_keep_below(&self, path: &str) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        let segments: Vec<&str> = path.split('/').collect();
        self.patterns
            .iter()
            .any(|pattern| prefix_could_match(pattern, &segments))
    }
}

fn check_brackets(segment: &str) -> Result<(), &'static str> {
    let chars: Vec<char> = segment.chars().collect();
    let mut index = 0;
    while index < chars.len() {
        if chars[index] == '[' {
            match match_class(&chars[index + 1..], '\0') {
                Some((_, after)) => index = chars.len() - after.len(),
                None => return Err("a `[` has no closing `]`"),
            }
        } else {
            index += 1;
        }
    }
    Ok(())
}

/// Matches a whole path against a pattern. `is_file` is false when the
/// path is a directory, which a trailing `**` needs something below.
fn match_segments(pattern: &[String], path: &[&str], is_file: bool) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            // A trailing `**` matches one or more segments; elsewhere it
            // matches zero or more.
            let minimum = usize::from(rest.is_empty());
            if rest.is_empty() && !is_file {
                // The directory itself is not inside `x/**`.
                return false;
            }
            (minimum..=path.len()).any(|skip| match_segments(rest, &path[skip..], is_file))
        }
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => {
                match_segment(first, segment) && match_segments(rest, path_rest, is_file)
            }
            None => false,
        },
    }
}

/// Returns whether some path below the directory `path` could match.
fn prefix_could_match(pattern: &[String], path: &[&str]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some((first, _)), Some(_)) if first == "**" => true,
        (Some((first, rest)), Some((segment, path_rest))) => {
            match_segment(first, segment) && prefix_could_match(rest, path_rest)
        }
    }
}

/// Matches one segment against one pattern segment (`*`, `?`, `[...]`).
fn match_segment(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    match_chars(&pattern, &name)
}

fn match_chars(pattern: &[char], name: &[char]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some(('*', rest)) => (0..=name.len()).any(|skip| match_chars(rest, &name[skip..])),
        Some(('?', rest)) => !name.is_empty() && match_chars(rest, &name[1..]),
        Some(('[', rest)) => {
            let Some((&c, name_rest)) = name.split_first() else {
                return false;
            };
            match match_class(rest, c) {
                Some((true, after)) => match_chars(after, name_rest),
                Some((false, _)) => false,
                // Parsing rejected unclosed brackets; treat one as literal.
                None => c == '[' && match_chars(rest, name_rest),
            }
        }
        Some((literal, rest)) => name.first() == Some(literal) && match_chars(rest, &name[1..]),
    }
}

/// Matches `c` against the class after a `[`. Returns whether it matched
/// and the pattern after the closing `]`.
fn match_class(class: &[char], c: char) -> Option<(bool, &[char])> {
    let (negated, mut rest) = match class.first() {
        Some('^') | Some('!') => (true, &class[1..]),
        _ => (false, class),
    };
    let mut matched = false;
    let mut first = true;
    loop {
        match rest {
            [] => return None,
            [']', after @ ..] if !first => return Some((matched != negated, after)),
            [low, '-', high, after @ ..] if *high != ']' => {
                matched |= (*low..=*high).contains(&c);
                rest = after;
            }
            [single, after @ ..] => {
                matched |= *single == c;
                rest = after;
            }
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(patterns: &[&str]) -> Globs {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        Globs::parse(&patterns).unwrap()
    }

    #[test]
    fn empty_list_keeps_everything() {
        assert!(globs(&[]).keeps_file("any/file"));
    }

    #[test]
    fn star_stays_within_a_segment() {
        let g = globs(&["*.txt"]);
        assert!(g.keeps_file("a.txt"));
        assert!(!g.keeps_file("dir/a.txt"));
        assert!(!g.keeps_file("a.dat"));
    }

    #[test]
    fn question_mark_and_classes() {
        let g = globs(&["file?.[a-c]", "x[!0-9]"]);
        assert!(g.keeps_file("file1.b"));
        assert!(!g.keeps_file("file1.d"));
        assert!(!g.keeps_file("file12.b"));
        assert!(g.keeps_file("xa"));
        assert!(!g.keeps_file("x5"));
        assert!(globs(&["x[^0-9]"]).keeps_file("xz"));
    }

    #[test]
    fn double_star_positions() {
        let leading = globs(&["**/*.log"]);
        assert!(leading.keeps_file("a.log"));
        assert!(leading.keeps_file("a/b/c.log"));
        let inner = globs(&["a/**/z"]);
        assert!(inner.keeps_file("a/z"));
        assert!(inner.keeps_file("a/b/c/z"));
        assert!(!inner.keeps_file("b/z"));
    }

    #[test]
    fn trailing_double_star_needs_a_directory() {
        let g = globs(&["foo*/**"]);
        assert!(g.keeps_file("foo/a"));
        assert!(g.keeps_file("foobar/deep/a"));
        assert!(!g.keeps_file("foo"));
    }

    #[test]
    fn matching_directory_keeps_its_contents() {
        let g = globs(&["sub"]);
        assert!(g.keeps_file("sub/a"));
        assert!(g.keeps_file("sub/deeper/b"));
        assert!(!g.keeps_file("other/a"));
    }

    #[test]
    fn pruning_skips_directories_that_cannot_match() {
        let g = globs(&["keep/*.txt"]);
        assert!(g.may_keep_below("keep"));
        assert!(!g.may_keep_below("drop"));
        assert!(globs(&["**/x"]).may_keep_below("any/where"));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in ["", "/", "a//b", "a**", "[abc"] {
            let error = Globs::parse(&[bad.to_string()]).unwrap_err();
            assert_eq!(error.pattern, bad);
        }
    }
}
