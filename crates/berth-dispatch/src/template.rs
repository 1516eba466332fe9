//! Argument templates: extra `sbatch` or `bsub` arguments that name the
//! job's values in braces, such as `--extra=ram={ram_mib}`.
//!
//! A template is one command-line argument. `{name}` is replaced with the
//! value of a [`Placeholder`], and `{{` and `}}` stand for literal braces.
//! Templates are parsed when the configuration is validated, so an unknown
//! placeholder or an unbalanced brace stops the dispatcher at start-up.
//!
//! A placeholder can expand to an empty string: `{partitions}` with no
//! partition, `{time_minutes}` with no run limit, `{gpus}` and the `gpu_*`
//! placeholders with no GPU. An argument in which any placeholder expands
//! to an empty string is left out. If that argument is an option's value
//! (it does not start with `-`), and the argument before it is the option
//! name alone (it starts with `-`, has no `=` and no placeholder), the
//! option name is left out too. So `["-q", "{partitions}"]` disappears as a
//! pair, and `--gres=gpu:{gpus}` disappears alone.

use std::fmt;

use crate::backend::JobRequest;

/// A value a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// `{uuid}`: the container UUID, which is also the job name.
    Uuid,
    /// `{ram_mib}`: the job's memory in MiB, the container's RAM plus the
    /// configured reserve (the value of `sbatch --mem`).
    RamMib,
    /// `{vcpus}`: the container's CPU count.
    Vcpus,
    /// `{tmp_mib}`: the job's scratch space in MiB: the container's `tmp`
    /// mounts plus the configured reserve.
    TmpMib,
    /// `{gpus}`: the number of GPUs; empty when the container requests none.
    Gpus,
    /// `{gpu_stack}`: `cuda` or `rocm`; empty without GPUs.
    GpuStack,
    /// `{gpu_driver_version}`: the minimum driver version, such as `12.4`;
    /// empty when the container names none.
    GpuDriverVersion,
    /// `{gpu_hardware_target}`: the accepted hardware targets joined with
    /// `,`; empty when the container names none.
    GpuHardwareTarget,
    /// `{gpu_vram_mib}`: the minimum memory per GPU in MiB, rounded up;
    /// empty when the container names none.
    GpuVramMib,
    /// `{partitions}`: the partitions (Slurm, joined with `,`) or queues
    /// (LSF, joined with a space) the job may run in. It is the configured
    /// default when the container names none, and empty without either.
    Partitions,
    /// `{time_minutes}`: `max_run_time` in whole minutes, rounded up;
    /// empty when the container has no run limit.
    TimeMinutes,
    /// `{priority}`: the container's priority when the job is submitted.
    Priority,
}

impl Placeholder {
    /// Every placeholder, in the order the documentation lists them.
    pub const ALL: [Placeholder; 12] = [
        Placeholder::Uuid,
        Placeholder::RamMib,
        Placeholder::Vcpus,
        Placeholder::TmpMib,
        Placeholder::Gpus,
        Placeholder::GpuStack,
        Placeholder::GpuDriverVersion,
        Placeholder::GpuHardwareTarget,
        Placeholder::GpuVramMib,
        Placeholder::Partitions,
        Placeholder::TimeMinutes,
        Placeholder::Priority,
    ];

    /// Returns the name written between the braces.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::Uuid => "uuid",
            Placeholder::RamMib => "ram_mib",
            Placeholder::Vcpus => "vcpus",
            Placeholder::TmpMib => "tmp_mib",
            Placeholder::Gpus => "gpus",
            Placeholder::GpuStack => "gpu_stack",
            Placeholder::GpuDriverVersion => "gpu_driver_version",
            Placeholder::GpuHardwareTarget => "gpu_hardware_target",
            Placeholder::GpuVramMib => "gpu_vram_mib",
            Placeholder::Partitions => "partitions",
            Placeholder::TimeMinutes => "time_minutes",
            Placeholder::Priority => "priority",
        }
    }

    fn from_name(name: &str) -> Option<Placeholder> {
        Placeholder::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Value(Placeholder),
}

/// One parsed argument template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgTemplate {
    /// The template as written in the configuration.
    source: String,
    pieces: Vec<Piece>,
}

impl ArgTemplate {
    /// Parses one template. The error message names the problem and its fix.
    pub fn parse(source: &str) -> Result<ArgTemplate, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, next)| *next) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|(_, next)| *next) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => {
                    return Err(format!(
                        "{source:?} has an unmatched '}}' at byte {start}: write '}}}}' for a literal brace"
                    ));
                }
                '{' => {
                    let rest = &source[start + 1..];
                    let Some(end) = rest
                        .find(['}', '{'])
                        .filter(|end| rest[*end..].starts_with('}'))
                    else {
                        return Err(format!(
                            "{source:?} has an unclosed '{{' at byte {start}: close the placeholder with '}}', or write '{{{{' for a literal brace"
                        ));
                    };
                    let name = &rest[..end];
                    let placeholder = Placeholder::from_name(name).ok_or_else(|| {
                        format!(
                            "{source:?} names the unknown placeholder {{{name}}}: use one of {}",
                            known_placeholders()
                        )
                    })?;
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Value(placeholder));
                }
                other => text.push(other),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(ArgTemplate {
            source: source.to_string(),
            pieces,
        })
    }

    /// Returns the template as written in the configuration.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Returns the literal text before the first placeholder, with braces
    /// unescaped: the part that names an option.
    pub fn literal_prefix(&self) -> &str {
        match self.pieces.first() {
            Some(Piece::Text(text)) => text,
            _ => "",
        }
    }

    /// True when the template names at least one placeholder.
    pub fn has_placeholders(&self) -> bool {
        self.pieces
            .iter()
            .any(|piece| matches!(piece, Piece::Value(_)))
    }

    /// True for an option name alone, such as `-q`: it starts with `-`,
    /// has no `=` and no placeholder.
    fn is_bare_option(&self) -> bool {
        !self.has_placeholders() && self.source.starts_with('-') && !self.source.contains('=')
    }

    /// Expands the template, or returns `None` when a placeholder expands
    /// to an empty string.
    fn expand(&self, values: &TemplateValues) -> Option<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Value(placeholder) => {
                    let value = values.get(*placeholder);
                    if value.is_empty() {
                        return None;
                    }
                    out.push_str(value);
                }
            }
        }
        Some(out)
    }
}

/// Lists the placeholder names for error messages.
fn known_placeholders() -> String {
    Placeholder::ALL
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a list of templates. The error carries the index of the bad
/// entry and its message.
pub fn parse_all(sources: &[String]) -> Result<Vec<ArgTemplate>, (usize, String)> {
    sources
        .iter()
        .enumerate()
        .map(|(index, source)| ArgTemplate::parse(source).map_err(|message| (index, message)))
        .collect()
}

/// The values of one job, as the placeholders expand them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateValues {
    pub uuid: String,
    pub ram_mib: String,
    pub vcpus: String,
    pub tmp_mib: String,
    pub gpus: String,
    pub gpu_stack: String,
    pub gpu_driver_version: String,
    pub gpu_hardware_target: String,
    pub gpu_vram_mib: String,
    pub partitions: String,
    pub time_minutes: String,
    pub priority: String,
}

impl TemplateValues {
    /// Collects the values of one job. `ram_mib` and `tmp_mib` include the
    /// configured reserves, and `partitions` is already joined the
    /// backend's way (empty for none).
    pub fn for_job(
        request: &JobRequest,
        ram_mib: u64,
        tmp_mib: u64,
        partitions: String,
    ) -> TemplateValues {
        let nonzero = |value: u64| {
            if value == 0 {
                String::new()
            } else {
                value.to_string()
            }
        };
        let gpu = &request.gpu;
        TemplateValues {
            uuid: request.container_uuid.clone(),
            ram_mib: ram_mib.to_string(),
            vcpus: request.vcpus.to_string(),
            tmp_mib: tmp_mib.to_string(),
            gpus: nonzero(gpu.count),
            gpu_stack: gpu.stack.clone(),
            gpu_driver_version: gpu.driver_version.clone(),
            gpu_hardware_target: gpu.hardware_target.join(","),
            gpu_vram_mib: nonzero(gpu.vram.div_ceil(1 << 20)),
            partitions,
            time_minutes: nonzero(request.max_run_time.div_ceil(60)),
            priority: request.priority.to_string(),
        }
    }

    fn get(&self, placeholder: Placeholder) -> &str {
        match placeholder {
            Placeholder::Uuid => &self.uuid,
            Placeholder::RamMib => &self.ram_mib,
            Placeholder::Vcpus => &self.vcpus,
            Placeholder::TmpMib => &self.tmp_mib,
            Placeholder::Gpus => &self.gpus,
            Placeholder::GpuStack => &self.gpu_stack,
            Placeholder::GpuDriverVersion => &self.gpu_driver_version,
            Placeholder::GpuHardwareTarget => &self.gpu_hardware_target,
            Placeholder::GpuVramMib => &self.gpu_vram_mib,
            Placeholder::Partitions => &self.partitions,
            Placeholder::TimeMinutes => &self.time_minutes,
            Placeholder::Priority => &self.priority,
        }
    }
}

/// Expands a list of templates into arguments, leaving out the arguments
/// with an empty placeholder and the option names before them, as the
/// module documentation describes.
pub fn expand_all(templates: &[ArgTemplate], values: &TemplateValues) -> Vec<String> {
    let mut args = Vec::with_capacity(templates.len());
    // Whether the last argument pushed is templates[i - 1], a bare option.
    let mut last_is_bare_option = false;
    for template in templates {
        match template.expand(values) {
            Some(arg) => {
                args.push(arg);
                last_is_bare_option = template.is_bare_option();
            }
            None => {
                if last_is_bare_option && !template.source.starts_with('-') {
                    args.pop();
                }
                last_is_bare_option = false;
            }
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> TemplateValues {
        TemplateValues {
            uuid: "zzzzz-dz642-000000000000001".into(),
            ram_mib: "1280".into(),
            vcpus: "2".into(),
            tmp_mib: "0".into(),
            priority: "500".into(),
            ..TemplateValues::default()
        }
    }

    fn expand(sources: &[&str], values: &TemplateValues) -> Vec<String> {
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        expand_all(&parse_all(&sources).unwrap(), values)
    }

    #[test]
    fn placeholders_expand() {
        let args = expand(
            &[
                "--extra=mem:{ram_mib},cpu:{vcpus},tmp:{tmp_mib}",
                "--comment-prefix={uuid}/{priority}",
            ],
            &values(),
        );
        assert_eq!(
            args,
            [
                "--extra=mem:1280,cpu:2,tmp:0",
                "--comment-prefix=zzzzz-dz642-000000000000001/500"
            ]
        );
    }

    #[test]
    fn doubled_braces_are_literal() {
        let args = expand(&["-R", "{{ select[mem>{ram_mib}] }}"], &values());
        assert_eq!(args, ["-R", "{ select[mem>1280] }"]);
        let plain = ArgTemplate::parse("a}}b{{c").unwrap();
        assert_eq!(plain.literal_prefix(), "a}b{c");
        assert!(!plain.has_placeholders());
    }

    #[test]
    fn every_placeholder_has_a_name() {
        for placeholder in Placeholder::ALL {
            let template = ArgTemplate::parse(&placeholder.to_string()).unwrap();
            assert_eq!(template.pieces, [Piece::Value(placeholder)]);
        }
    }

    #[test]
    fn bad_templates_are_rejected() {
        let cases = [
            ("--x={nope}", "unknown placeholder {nope}"),
            ("--x={RAM_MIB}", "unknown placeholder"),
            ("--x={ram_mib", "unclosed '{'"),
            ("--x={ram_mib{vcpus}}", "unclosed '{'"),
            ("--x=ram_mib}", "unmatched '}'"),
            ("--x={}", "unknown placeholder {}"),
        ];
        for (source, expected) in cases {
            let err = ArgTemplate::parse(source).unwrap_err();
            assert!(err.contains(expected), "{source}: {err}");
            assert!(err.contains(&format!("{source:?}")), "{source}: {err}");
        }
        let err = ArgTemplate::parse("{nope}").unwrap_err();
        assert!(err.contains("{ram_mib}"), "lists the known names: {err}");
    }

    #[test]
    fn parse_all_names_the_bad_entry() {
        let sources = vec!["--ok".to_string(), "--bad={x}".to_string()];
        let (index, message) = parse_all(&sources).unwrap_err();
        assert_eq!(index, 1);
        assert!(message.contains("{x}"), "{message}");
    }

    #[test]
    fn empty_value_drops_the_argument() {
        let args = expand(&["--exclusive", "--gres=gpu:{gpus}", "--x"], &values());
        assert_eq!(args, ["--exclusive", "--x"]);
    }

    #[test]
    fn empty_value_drops_its_option_name() {
        let args = expand(
            &[
                "-P",
                "proj",
                "-q",
                "{partitions}",
                "-W",
                "{time_minutes}",
                "-x",
            ],
            &values(),
        );
        assert_eq!(args, ["-P", "proj", "-x"]);

        let mut full = values();
        full.partitions = "short long".into();
        full.time_minutes = "2".into();
        let args = expand(&["-q", "{partitions}", "-W", "{time_minutes}"], &full);
        assert_eq!(args, ["-q", "short long", "-W", "2"]);
    }

    #[test]
    fn attached_value_drops_alone() {
        // `--x=1` carries its own value, and `-y{gpus}` is an option itself.
        let args = expand(&["--x=1", "{gpus}", "-z", "-y{gpus}"], &values());
        assert_eq!(args, ["--x=1", "-z"]);
    }
}
