#!/usr/bin/env bash
# Measure `cat` of 1 GiB through `berth shell` against OpenSSH to a local
# sshd doing the same.
#
# Berth's way: a controller (SQLite) and a dispatcher with the local
# backend, whose supervisor runs a Podman container with its SSH gateway
# and tunnel. The container first writes SIZE bytes to /tmp/bench-data.
# The script times
#   berth shell UUID -- cat /tmp/bench-data  >/dev/null
# which runs the system ssh with `berth ssh-proxy` as its ProxyCommand:
# ssh -> ssh-proxy -> controller -> tunnel -> gateway (russh) -> the exec
# (`crun exec` run by the supervisor, on Podman and with the oci runtime)
# -> the container's `cat`.
# The baseline: a temporary sshd on a free loopback port, with its own
# configuration, host key and authorized key in the scratch directory,
# and `ssh -p PORT root@127.0.0.1 cat WORK/bench-data >/dev/null` of a
# file of the same size. The image's `cat` is busybox's, which copies a
# file to a pipe as fast as GNU cat does.
# Both use the ssh client's default cipher order, so both negotiate the
# same cipher (logged as "cipher").
#
# Each way runs ROUNDS times after one warm-up run, the two ways
# alternating. The script prints each way's median time and MiB/s, and
# the ratio of the two throughputs (berth / sshd, goal at least 0.8).
# Then each way runs once more while the script records the CPU time of
# each process on its path. The client side (ssh, and berth's ssh-proxy)
# comes from the children's resource usage. The servers' times come from
# /proc/PID/stat, with the children they reaped, such as sshd's sessions.
# Processes that nobody reaps (Podman's conmon, the container's `head`)
# are not counted.
#
# Usage: scripts/bench/run-shell.sh [SIZE_MIB] [ROUNDS]  (as root; default 1024 and 3)
# Tunables (environment variables):
#   BERTH_BENCH_BIN     berth binary        [target/release/berth, built when a source changed]
#   BERTH_PODMAN_SOCK   Podman API socket                [/run/berth/podman.sock]
#   BERTH_TEST_IMAGE    image to run                  [localhost/busybox:latest]
#   BERTH_BENCH_RUNTIME the supervisor's runtime: docker (a container of
#                       Podman's API, execs as BERTH_BENCH_PODMAN_COMMAND
#                       selects) or oci (the supervisor's own crun
#                       container)                                  [docker]
#   BERTH_BENCH_PODMAN_COMMAND  supervisor.podman_command: the Podman command
#                       line that finds the exec route on Podman (crun
#                       directly, else `podman exec`), or null for
#                       Podman's exec API                         [podman]
#   BERTH_TEST_IMAGE_ARCHIVE  `docker save` archive of the image, for oci
#                             [/var/lib/berth/test-image/busybox.tar]
# Needs python3, OpenSSH's client, Podman's API socket with the test image
# (scripts/setup/podman.sh service-start, test-image.sh). Installs
# openssh-server with apt when sshd is missing; the package's own host
# keys and service stay unused.
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"
# shellcheck source=scripts/bench/lib.sh
. "$REPO_ROOT/scripts/bench/lib.sh"

SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
: "${BERTH_BENCH_BIN:=$REPO_ROOT/target/release/berth}"
: "${BERTH_PODMAN_SOCK:=$BERTH_RUN_DIR/podman.sock}"
: "${BERTH_TEST_IMAGE:=localhost/busybox:latest}"
: "${BERTH_BENCH_RUNTIME:=docker}"
: "${BERTH_BENCH_PODMAN_COMMAND:=podman}"
: "${BERTH_TEST_IMAGE_ARCHIVE:=$BERTH_STATE_DIR/test-image/busybox.tar}"
require_root "$@"
case "$BERTH_BENCH_RUNTIME" in
  docker) image=$BERTH_TEST_IMAGE ;;
  oci)
    [ -f "$BERTH_TEST_IMAGE_ARCHIVE" ] || die "no image archive at $BERTH_TEST_IMAGE_ARCHIVE: run scripts/setup/test-image.sh or set BERTH_TEST_IMAGE_ARCHIVE"
    command -v crun >/dev/null || die "crun not found: run scripts/setup/podman.sh, which installs it"
    image=$BERTH_TEST_IMAGE_ARCHIVE
    ;;
  *) die "invalid BERTH_BENCH_RUNTIME '$BERTH_BENCH_RUNTIME': use docker or oci" ;;
esac
[[ "$SIZE_MIB" =~ ^[1-9][0-9]*$ ]] || die "invalid SIZE_MIB '$SIZE_MIB': give a positive whole number"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
[ -S "$BERTH_PODMAN_SOCK" ] || die "no Podman socket at $BERTH_PODMAN_SOCK: run scripts/setup/podman.sh service-start"
command -v python3 >/dev/null || die "python3 not found: install it"
command -v ssh >/dev/null || die "ssh not found: install openssh-client"
[ -x /usr/sbin/sshd ] || apt_install openssh-server
[ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd not found after installing openssh-server"

bench_build "$BERTH_BENCH_BIN"
bench_start_controller "$BERTH_BENCH_BIN" berth-shell-bench
bench_write_config "$work/dispatch.yml" local false 1 300
# The supervisor section's keys follow its first line.
if [ "$BERTH_BENCH_RUNTIME" = oci ]; then
  sed -i "/^supervisor:/a\\  runtime: oci\\n  image_archive_dirs: [$(dirname "$BERTH_TEST_IMAGE_ARCHIVE")]" "$work/dispatch.yml"
fi
sed -i "/^supervisor:/a\\  podman_command: $BERTH_BENCH_PODMAN_COMMAND" "$work/dispatch.yml"

dispatcher_pid=""
sshd_pid=""
shell_cleanup() {
  [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null && wait "$sshd_pid" 2>/dev/null
  [ -n "$dispatcher_pid" ] && stop_process "$dispatcher_pid" "berth dispatch" 30
  bench_cleanup
}
trap shell_cleanup EXIT

# The baseline sshd: everything it reads is in $work/sshd. StrictModes is
# off because the scratch directory lives under /tmp, which is writable by
# everyone.
mkdir -m 0700 "$work/sshd"
ssh-keygen -q -t ed25519 -N '' -f "$work/sshd/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/sshd/client_key"
cp "$work/sshd/client_key.pub" "$work/sshd/authorized_keys"
sshd_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/sshd/sshd_config" <<EOF
ListenAddress 127.0.0.1:$sshd_port
HostKey $work/sshd/host_key
PidFile none
AuthorizedKeysFile $work/sshd/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
EOF
# sshd needs its privilege separation directory; Debian's package makes it
# only when its service starts.
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$work/sshd/sshd_config" 2>"$work/sshd.log" &
sshd_pid=$!
ssh_baseline=(ssh -F /dev/null -p "$sshd_port" -i "$work/sshd/client_key"
  -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o BatchMode=yes
  -o LogLevel=ERROR root@127.0.0.1)
for _ in $(seq 100); do
  "${ssh_baseline[@]}" true 2>/dev/null && break
  kill -0 "$sshd_pid" 2>/dev/null || { cat "$work/sshd.log" >&2; die "sshd exited"; }
  sleep 0.1
done
"${ssh_baseline[@]}" true || die "sshd on port $sshd_port did not accept the key; see $work/sshd.log"

RUST_LOG=info "$BERTH_BENCH_BIN" dispatch --config "$work/dispatch.yml" 2>"$work/dispatch.log" &
dispatcher_pid=$!

cat >"$work/bench.py" <<'EOF'
import json, os, re, resource, statistics, subprocess, sys, time
import urllib.request

berth, work, api_url, token, image, size_mib, rounds, controller_pid, sshd_pid = sys.argv[1:10]
size_mib, rounds = int(size_mib), int(rounds)
baseline = sys.argv[10:]
api_url = api_url.rstrip("/")
command = "cat /tmp/bench-data"
baseline_data = os.path.join(work, "bench-data")
with open(baseline_data, "wb") as data:
    block = bytes(1 << 20)
    for _ in range(size_mib):
        data.write(block)
baseline_command = "cat " + baseline_data
env = dict(os.environ, BERTH_API_HOST=api_url, BERTH_API_TOKEN=token)
env.pop("ARVADOS_API_HOST", None)
env.pop("ARVADOS_API_TOKEN", None)


def fail(message):
    sys.exit("error: " + message)


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api_url + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def timed(argv):
    """Runs argv with stdout to /dev/null and returns the seconds it took."""
    start = time.monotonic()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        fail("%s exited with %d: %s" % (argv[0], done.returncode, done.stderr.decode(errors="replace")))
    return seconds


def cipher(argv):
    """Returns the cipher that ssh negotiates, from its debug output."""
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env)
    found = re.search(r"cipher: (\S+)", done.stderr.decode(errors="replace"))
    return found.group(1) if found else "unknown"


def cpu_seconds(pid):
    """Returns the CPU time of a process and its reaped children."""
    with open("/proc/%s/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime and cstime are fields 14 to 17 of the line.
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def find_pid(*parts):
    """Returns the PID of the process whose command line has all parts."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                words = cmdline.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(any(part in word for word in words) for part in parts):
            return entry
    return None


def profile(name, argv, processes):
    """Runs argv once more and prints the CPU seconds each process spent."""
    before = {label: cpu_seconds(pid) for label, pid in processes.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = timed(argv)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [("client (%s, its ProxyCommand)" % os.path.basename(argv[0]),
             after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)]
    rows += [(label, cpu_seconds(pid) - before[label]) for label, pid in processes.items()]
    print()
    print("%s, one more run of %.2f s: CPU seconds per process" % (name, seconds))
    print()
    print("| process | CPU (s) | share of the run's wall time |")
    print("| --- | --- | --- |")
    for label, cpu in rows:
        print("| %s | %.2f | %.0f %% |" % (label, cpu, 100 * cpu / seconds))


request = call("POST", "/arvados/v1/container_requests", {"container_request": {
    "state": "Committed", "priority": 1, "use_existing": False,
    "container_image": image, "output_path": "/out",
    "command": ["sh", "-c", "head -c %d /dev/zero >/tmp/bench-data.part && "
                "mv /tmp/bench-data.part /tmp/bench-data && exec sleep 3600" % (size_mib << 20)],
    "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
    "runtime_constraints": {"ram": (size_mib + 256) << 20, "vcpus": 1},
}})
uuid = request["container_uuid"]
try:
    deadline = time.monotonic() + 180
    while True:
        container = call("GET", "/arvados/v1/containers/" + uuid)
        if container["state"] == "Running" and container.get("gateway_host_key"):
            break
        if container["state"] in ("Complete", "Cancelled"):
            fail("container %s ended %s before the benchmark" % (uuid, container["state"]))
        if time.monotonic() > deadline:
            fail("container %s was not Running with a host key within 180 s" % uuid)
        time.sleep(0.5)
    shell = [berth, "shell", uuid, "--"]
    # The tunnel dials once the gateway is ready: wait until a shell works.
    for attempt in range(120):
        if subprocess.run(shell + ["true"], stdin=subprocess.DEVNULL, capture_output=True,
                          env=env).returncode == 0:
            break
        time.sleep(0.5)
    else:
        fail("berth shell %s did not work within 60 s" % uuid)
    for attempt in range(240):
        if subprocess.run(shell + ["test -f /tmp/bench-data"], stdin=subprocess.DEVNULL,
                          capture_output=True, env=env).returncode == 0:
            break
        time.sleep(0.5)
    else:
        fail("container %s did not write /tmp/bench-data within 120 s" % uuid)

    # The client chooses the cipher. `berth shell` offers AES-GCM first; the
    # second way insists on OpenSSH's own first choice, for comparison.
    chacha = [berth, "shell", "-o", "Ciphers=chacha20-poly1305@openssh.com", uuid, "--"]
    ways = {"berth shell": shell + [command], "berth shell, chacha20-poly1305": chacha + [command],
            "ssh to sshd": baseline + [baseline_command]}
    # For ssh, the first value of an option wins, so -v goes before the
    # baseline's LogLevel.
    print("cipher: berth shell %s, ssh to sshd %s" % (
        cipher([berth, "shell", "-o", "LogLevel=DEBUG1", uuid, "--", "true"]),
        cipher(baseline[:1] + ["-v"] + baseline[1:] + ["true"])), file=sys.stderr)
    for name, argv in ways.items():
        print("warm-up: %s %.2f s" % (name, timed(argv)), file=sys.stderr)
    times = {name: [] for name in ways}
    for number in range(1, rounds + 1):
        for name, argv in ways.items():
            times[name].append(timed(argv))
        print("round %d of %d: %s" % (number, rounds, ", ".join(
            "%s %.2f s" % (name, times[name][-1]) for name in ways)), file=sys.stderr)
    servers = {"controller": controller_pid, "supervisor": find_pid("supervise", uuid),
               "Podman API service": find_pid("podman", "system", "service")}
    profile("berth shell", ways["berth shell"], {label: pid for label, pid in servers.items() if pid})
    profile("ssh to sshd", ways["ssh to sshd"], {"sshd and its sessions": sshd_pid})
finally:
    # Cancel the container and wait for its final state, so that its
    # supervisor records it and exits before the controller stops.
    call("PUT", "/arvados/v1/container_requests/" + request["uuid"],
         {"container_request": {"priority": 0}})
    deadline = time.monotonic() + 120
    while call("GET", "/arvados/v1/containers/" + uuid)["state"] not in ("Complete", "Cancelled"):
        if time.monotonic() > deadline:
            print("container %s did not end within 120 s of its cancellation" % uuid,
                  file=sys.stderr)
            break
        time.sleep(0.5)

print()
print("| way | rounds | median (s) | min (s) | max (s) | MiB/s (median) | this / ssh to sshd |")
print("| --- | --- | --- | --- | --- | --- | --- |")
rates = {name: size_mib / statistics.median(times[name]) for name in times}
for name in times:
    print("| %s | %d | %.2f | %.2f | %.2f | %.0f | %.2f |" % (
        name, rounds, statistics.median(times[name]), min(times[name]), max(times[name]),
        rates[name], rates[name] / rates["ssh to sshd"]))
print()
print("ratio (berth shell MiB/s / ssh to sshd MiB/s): %.2f" % (rates["berth shell"] / rates["ssh to sshd"]))
EOF

log "$ROUNDS rounds of $SIZE_MIB MiB each way, supervisor runtime $BERTH_BENCH_RUNTIME"
python3 "$work/bench.py" "$BERTH_BENCH_BIN" "$work" "$api_url" "$user_token" "$image" \
  "$SIZE_MIB" "$ROUNDS" "$controller_pid" "$sshd_pid" "${ssh_baseline[@]}"
printf '\nsupervisor runtime %s, %s CPUs, %s\n' "$BERTH_BENCH_RUNTIME" "$(nproc)" "$(ssh -V 2>&1)"
