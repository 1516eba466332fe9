//! Start-up checks of the configured extra `sbatch` and `bsub` arguments.
//!
//! Each configured argument is an [`ArgTemplate`]. Besides its syntax,
//! the check rejects options that clash with the dispatcher's own. Some
//! let the dispatcher find its jobs again (the job name, the parsable
//! output). Others carry the resources it sets from the container (memory,
//! CPUs, scratch space, partition, run limit). A repeated option would silently replace
//! the container's values, because Slurm keeps the last occurrence of an
//! option. GPU options belong to the separate GPU list, which is used only
//! for containers that request GPUs.

use crate::template::{parse_all, ArgTemplate};

/// An `sbatch` option: its long name, its short letter, and why a
/// configured argument must not set it.
type SbatchOption = (&'static str, Option<char>, &'static str);

/// `sbatch` options that the dispatcher sets itself or that would break
/// tracking.
const RESERVED_SBATCH_OPTIONS: &[SbatchOption] = &[
    (
        "--job-name",
        Some('J'),
        "the job name is the container UUID, by which the dispatcher finds the job again",
    ),
    (
        "--parsable",
        None,
        "the dispatcher reads the job id from sbatch's parsable output",
    ),
    (
        "--output",
        Some('o'),
        "set the output file with dispatch.slurm.output",
    ),
    (
        "--requeue",
        None,
        "a requeued job would run a container that was already cancelled",
    ),
    ("--no-requeue", None, "the dispatcher sets it on every job"),
    ("--array", Some('a'), "one job runs one container"),
    ("--wrap", None, "the dispatcher supplies the job script"),
    (
        "--comment",
        None,
        "the dispatcher sets it to the container UUID",
    ),
    (
        "--chdir",
        Some('D'),
        "the dispatcher starts every job in /, a directory every node has",
    ),
    (
        "--mem",
        None,
        "the dispatcher sets it from runtime_constraints.ram plus dispatch.slurm.reserve_ram",
    ),
    (
        "--mem-per-cpu",
        None,
        "sbatch does not combine it with the --mem the dispatcher sets",
    ),
    (
        "--mem-per-gpu",
        None,
        "sbatch does not combine it with the --mem the dispatcher sets",
    ),
    (
        "--cpus-per-task",
        Some('c'),
        "the dispatcher sets it from runtime_constraints.vcpus",
    ),
    (
        "--tmp",
        None,
        "the dispatcher sets it from the tmp mounts plus dispatch.slurm.reserve_tmp",
    ),
    (
        "--partition",
        Some('p'),
        "the dispatcher sets it from scheduling_parameters.partitions or dispatch.slurm.partition",
    ),
    (
        "--time",
        Some('t'),
        "the dispatcher sets it from scheduling_parameters.max_run_time",
    ),
    (
        "--nice",
        None,
        "the dispatcher orders pending jobs through their nice values (dispatch.slurm.priority_spread)",
    ),
];

/// `sbatch` GPU options, allowed only in `slurm.gpu_args`.
const SBATCH_GPU_OPTIONS: &[SbatchOption] = &[
    (
        "--gres",
        None,
        "GPU requests belong in dispatch.slurm.gpu_args, and sbatch keeps only the last --gres",
    ),
    (
        "--gpus",
        Some('G'),
        "GPU requests belong in dispatch.slurm.gpu_args",
    ),
];

/// `bsub` options that the dispatcher sets itself or that would break
/// tracking, each with the reason. `-I` stands for every interactive form
/// (`-Ip`, `-Is`, `-IS`, ...).
const RESERVED_BSUB_OPTIONS: &[(&str, &str)] = &[
    (
        "-J",
        "the job name is the container UUID, by which the dispatcher finds the job again",
    ),
    ("-o", "set the output file with dispatch.lsf.output"),
    ("-K", "bsub would wait for the job to end"),
    ("-I", "the job would be interactive"),
    (
        "-r",
        "a rerun job would run a container that was already cancelled",
    ),
    (
        "-n",
        "the dispatcher sets it from runtime_constraints.vcpus",
    ),
    (
        "-q",
        "the dispatcher sets it from scheduling_parameters.partitions or dispatch.lsf.queue",
    ),
    (
        "-W",
        "the dispatcher sets it from scheduling_parameters.max_run_time",
    ),
    ("-cwd", "the dispatcher starts every job in /"),
    (
        "-sp",
        "the dispatcher sets it when dispatch.lsf.user_priority is true",
    ),
];

/// The `bsub` GPU option, allowed only in `lsf.gpu_args`.
const BSUB_GPU_OPTION: (&str, &str) = ("-gpu", "GPU requests belong in dispatch.lsf.gpu_args");

/// Parses `sbatch` argument templates and rejects clashing options.
/// `gpu_list` allows the GPU options. The error carries the entry's index.
pub fn sbatch_templates(
    sources: &[String],
    gpu_list: bool,
) -> Result<Vec<ArgTemplate>, (usize, String)> {
    let gpu_options: &[SbatchOption] = if gpu_list { &[] } else { SBATCH_GPU_OPTIONS };
    check_templates(sources, |prefix| {
        RESERVED_SBATCH_OPTIONS
            .iter()
            .chain(gpu_options)
            .find(|(long, short, _)| names_sbatch_option(prefix, long, *short))
            .map(|(_, _, reason)| *reason)
    })
}

/// Parses `bsub` argument templates and rejects clashing options.
/// `gpu_list` allows `-gpu`. The error carries the entry's index.
pub fn bsub_templates(
    sources: &[String],
    gpu_list: bool,
) -> Result<Vec<ArgTemplate>, (usize, String)> {
    let gpu_option = (!gpu_list).then_some(&BSUB_GPU_OPTION);
    check_templates(sources, |arg| {
        RESERVED_BSUB_OPTIONS
            .iter()
            .chain(gpu_option)
            .find(|(option, _)| arg == *option || (*option == "-I" && is_interactive_option(arg)))
            .map(|(_, reason)| *reason)
    })
}

/// Parses templates and rejects each whose literal start `clash` returns
/// a reason for.
fn check_templates(
    sources: &[String],
    clash: impl Fn(&str) -> Option<&'static str>,
) -> Result<Vec<ArgTemplate>, (usize, String)> {
    let templates = parse_all(sources)?;
    for (index, template) in templates.iter().enumerate() {
        check_plain(template.source()).map_err(|message| (index, message))?;
        if let Some(reason) = clash(template.literal_prefix()) {
            return Err((
                index,
                format!(
                    "{:?} is not allowed: {reason}; remove the entry",
                    template.source()
                ),
            ));
        }
    }
    Ok(templates)
}

/// Rejects an empty argument and one with a newline or NUL byte, which
/// cannot pass through a command line intact.
fn check_plain(arg: &str) -> Result<(), String> {
    if arg.is_empty() {
        return Err("is empty: remove the entry".to_string());
    }
    if arg.contains(['\n', '\0']) {
        return Err(format!(
            "{arg:?} contains a newline or NUL byte: write the argument on one line"
        ));
    }
    Ok(())
}

/// True when `arg` (the literal start of a template) is the `sbatch`
/// option `long` (alone or with `=VALUE`) or `-SHORT` (alone or with its
/// value attached).
fn names_sbatch_option(arg: &str, long: &str, short: Option<char>) -> bool {
    let long_match = arg == long
        || arg
            .strip_prefix(long)
            .is_some_and(|rest| rest.starts_with('='));
    let short_match = short.is_some_and(|short| {
        let mut chars = arg.chars();
        chars.next() == Some('-') && chars.next() == Some(short)
    });
    long_match || short_match
}

/// True for bsub's interactive options: `-I`, `-Ip`, `-IS`, `-ISp`,
/// `-ISs`, `-Is`, `-IX`.
fn is_interactive_option(arg: &str) -> bool {
    matches!(arg, "-I" | "-Ip" | "-IS" | "-ISp" | "-ISs" | "-Is" | "-IX")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    type Check = fn(&[String], bool) -> Result<Vec<ArgTemplate>, (usize, String)>;

    /// Asserts that `check` accepts each argument alone.
    fn assert_accepted(check: Check, args: &[&str]) {
        for arg in args {
            let result = check(&strings(&[arg]), false);
            assert!(result.is_ok(), "{arg} rejected: {result:?}");
        }
    }

    #[test]
    fn reserved_sbatch_options_are_rejected() {
        for bad in [
            "--job-name=x",
            "-J",
            "-Jname",
            "--parsable",
            "--output=/x",
            "-o",
            "--requeue",
            "--no-requeue",
            "--array=1-3",
            "--wrap=true",
            "--comment={uuid}",
            "--chdir=/x",
            "--mem={ram_mib}",
            "--mem-per-cpu=1G",
            "-c4",
            "--cpus-per-task={vcpus}",
            "--tmp={tmp_mib}",
            "-p",
            "--partition={partitions}",
            "--time=10",
            "--nice=5",
            "--gres=gpu:{gpus}",
            "--gpus=2",
            "-G2",
        ] {
            let err = sbatch_templates(&strings(&["--account=x", bad]), false).unwrap_err();
            assert_eq!(err.0, 1, "{bad}");
            assert!(err.1.contains(&format!("{bad:?}")), "{bad}: {}", err.1);
            assert!(err.1.contains("remove the entry"), "{}", err.1);
        }
        assert_accepted(
            sbatch_templates,
            &[
                "--account=x",
                "--qos=high",
                "--exclusive",
                "--constraint=intel",
                "--open-mode=append",
                "--extra=mem={ram_mib}",
                "--gres-flags=enforce-binding",
                "--timeout-not-an-option",
            ],
        );
    }

    #[test]
    fn gpu_options_belong_in_the_gpu_list() {
        for gpu in [
            "--gres=gpu:{gpus}",
            "--gpus={gpus}",
            "--gres=gpu:a100:{gpus}",
        ] {
            assert!(sbatch_templates(&strings(&[gpu]), true).is_ok(), "{gpu}");
            let err = sbatch_templates(&strings(&[gpu]), false).unwrap_err();
            assert!(err.1.contains("gpu_args"), "{}", err.1);
        }
        assert!(sbatch_templates(&strings(&["--mem=1"]), true).is_err());

        assert!(bsub_templates(&strings(&["-gpu", "num={gpus}"]), true).is_ok());
        let err = bsub_templates(&strings(&["-gpu", "num={gpus}"]), false).unwrap_err();
        assert_eq!(err.0, 0);
        assert!(err.1.contains("dispatch.lsf.gpu_args"), "{}", err.1);
    }

    #[test]
    fn reserved_bsub_options_are_rejected() {
        for bad in [
            "-J", "-o", "-K", "-I", "-Is", "-IX", "-r", "-n", "-q", "-W", "-cwd", "-sp",
        ] {
            let err = bsub_templates(&strings(&["-P", "x", bad]), false).unwrap_err();
            assert_eq!(err.0, 2, "{bad}");
            assert!(err.1.contains("not allowed"), "{}", err.1);
        }
        assert_accepted(
            bsub_templates,
            &[
                "-P",
                "-R",
                "select[mem>{ram_mib}]",
                "-We",
                "-M",
                "-e",
                "-Ip-not",
            ],
        );
    }

    #[test]
    fn template_syntax_errors_name_the_entry() {
        let err = sbatch_templates(&strings(&["--a", "--x={ram}"]), false).unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("unknown placeholder {ram}"), "{}", err.1);
        let err = bsub_templates(&strings(&["-R", "rusage[mem={ram_mib]"]), false).unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("unclosed"), "{}", err.1);
        let err = bsub_templates(&strings(&["-P", ""]), false).unwrap_err();
        assert_eq!(err, (1, "is empty: remove the entry".to_string()));
        let err = sbatch_templates(&strings(&["--x=a\nb"]), false).unwrap_err();
        assert!(err.1.contains("newline"), "{}", err.1);
    }
}
