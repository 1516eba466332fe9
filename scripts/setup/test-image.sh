#!/usr/bin/env bash
# Build the container image Berth's tests and demo run, with no registry and
# no network, and load it into Podman.
#
# The image holds Debian's statically linked busybox (package busybox-static)
# with one symlink per applet, a minimal /etc/passwd and /etc/group (root,
# nobody) and a world-writable /tmp. It is written as a `docker save` archive
# (the format that `docker load`, `podman load` and the Docker API's
# POST /images/load accept):
#   manifest.json          Config, RepoTags and Layers of the one image
#   repositories           tag-to-layer map that older `docker load` reads
#   <config digest>.json   image config: Cmd, Env, rootfs.diff_ids
#   <diff id>/layer.tar    the single layer
#   <diff id>/VERSION, json  legacy layer metadata
#
# Every tar is written with sorted names, mtime 0 and owner 0, so the archive
# is the same byte for byte on every run and every machine with the same
# busybox-static version, and so is the image ID (the config's digest).
# The archive is rewritten only when its content changes, and loaded only
# when Podman does not already hold this image ID under the tag.
#
# Usage: scripts/setup/test-image.sh [--no-load]   (as root)
#   --no-load   build the archive only
#
# Tunables (environment variables):
#   BERTH_TEST_IMAGE          tag recorded in the archive; a "localhost/" name
#                             keeps Podman from resolving it on docker.io
#                                                   [localhost/busybox:latest]
#   BERTH_TEST_IMAGE_ARCHIVE  where the archive is written
#                                     [/var/lib/berth/test-image/busybox.tar]
set -euo pipefail
SETUP_NAME=test-image
# shellcheck source=scripts/setup/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BERTH_TEST_IMAGE:=localhost/busybox:latest}"
: "${BERTH_TEST_IMAGE_ARCHIVE:=$BERTH_STATE_DIR/test-image/busybox.tar}"

load=1
for arg in "$@"; do
  case "$arg" in
    --no-load) load=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg'; the only option is --no-load" ;;
  esac
done

t_script=$(now_ms)
require_root "$@"

# A name without a tag means ":latest", as in `docker pull`.
case "${BERTH_TEST_IMAGE##*/}" in
  *:*) image_ref=$BERTH_TEST_IMAGE ;;
  *) image_ref=$BERTH_TEST_IMAGE:latest ;;
esac
image_repo=${image_ref%:*}
image_tag=${image_ref##*:}

# --------------------------------------------------------------- busybox
apt_install busybox-static
busybox=/bin/busybox
[ "$(dpkg-query -S "$busybox" 2>/dev/null | cut -d: -f1)" = busybox-static ] \
  || die "$busybox does not come from busybox-static (the dynamically linked 'busybox' package may own it); run: apt-get install busybox-static"
# ldd prints "not a dynamic executable" for a static binary; a dynamic busybox
# would need a C library inside the image.
if ldd "$busybox" >/dev/null 2>&1; then
  die "$busybox is dynamically linked; the image needs the static one from busybox-static"
fi
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)

case "$(dpkg --print-architecture)" in
  amd64) arch=amd64 ;;
  arm64) arch=arm64 ;;
  *) die "unsupported architecture '$(dpkg --print-architecture)'; the image config supports amd64 and arm64" ;;
esac

# ----------------------------------------------------------------- layer
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,root,home,tmp,var/tmp}
chmod 0700 "$rootfs/root"
chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
install -m 0755 "$busybox" "$rootfs/bin/busybox"
# `--list-full` prints each applet at its usual path (bin/sh, usr/bin/env);
# entries without a directory, such as linuxrc, are skipped.
"$busybox" --list-full | while read -r applet; do
  case "$applet" in */*) ;; *) continue ;; esac
  [ -e "$rootfs/$applet" ] || [ -L "$rootfs/$applet" ] || ln -s /bin/busybox "$rootfs/$applet"
done
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$rootfs/etc/group"
# Container runtimes mount their own files over these two.
: >"$rootfs/etc/hosts"
: >"$rootfs/etc/resolv.conf"

reproducible_tar=(tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu)
# Member names carry no "./" prefix, as in archives that `docker save` writes.
(cd "$rootfs" && "${reproducible_tar[@]}" -cf "$work/layer.tar" -- *)
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)

# ------------------------------------------------------------ image config
epoch=1970-01-01T00:00:00Z
config=$(printf '{"architecture":"%s","os":"linux","created":"%s","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"Berth scripts/setup/test-image.sh from busybox-static %s"}]}' \
  "$arch" "$epoch" "$diff_id" "$epoch" "$busybox_version")
image_id=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)

archive_dir=$work/archive
mkdir -p "$archive_dir/$diff_id"
mv "$work/layer.tar" "$archive_dir/$diff_id/layer.tar"
printf '1.0' >"$archive_dir/$diff_id/VERSION"
printf '{"id":"%s","created":"%s","os":"linux"}' "$diff_id" "$epoch" >"$archive_dir/$diff_id/json"
printf '%s' "$config" >"$archive_dir/$image_id.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' \
  "$image_id" "$image_ref" "$diff_id" >"$archive_dir/manifest.json"
printf '{"%s":{"%s":"%s"}}' "$image_repo" "$image_tag" "$diff_id" >"$archive_dir/repositories"
(cd "$archive_dir" && "${reproducible_tar[@]}" -cf "$work/image.tar" -- *)

# --------------------------------------------------------------- archive
mkdir -p "$(dirname "$BERTH_TEST_IMAGE_ARCHIVE")"
if cmp -s "$work/image.tar" "$BERTH_TEST_IMAGE_ARCHIVE"; then
  log "$BERTH_TEST_IMAGE_ARCHIVE is up to date"
else
  # Written beside the target and renamed, so readers never see half a file.
  cp "$work/image.tar" "$BERTH_TEST_IMAGE_ARCHIVE.tmp"
  chmod 0644 "$BERTH_TEST_IMAGE_ARCHIVE.tmp"
  mv -f "$BERTH_TEST_IMAGE_ARCHIVE.tmp" "$BERTH_TEST_IMAGE_ARCHIVE"
  log "wrote $BERTH_TEST_IMAGE_ARCHIVE ($(du -h "$BERTH_TEST_IMAGE_ARCHIVE" | cut -f1))"
fi

# ------------------------------------------------------------------ load
if [ "$load" = 1 ]; then
  command -v podman >/dev/null || die "podman not found; run scripts/setup/podman.sh first, or pass --no-load"
  loaded_id=$(podman image inspect --format '{{.Id}}' "$image_ref" 2>/dev/null || true)
  if [ "$loaded_id" = "$image_id" ]; then
    log "podman already holds $image_ref as sha256:$image_id"
  else
    output=$(podman load -q -i "$BERTH_TEST_IMAGE_ARCHIVE" 2>&1) \
      || die "podman load -i $BERTH_TEST_IMAGE_ARCHIVE failed: $output"
    loaded_id=$(podman image inspect --format '{{.Id}}' "$image_ref" 2>/dev/null || true)
    [ "$loaded_id" = "$image_id" ] \
      || die "after podman load, $image_ref has image ID '${loaded_id:-none}', expected $image_id"
    log "loaded $image_ref (sha256:$image_id) into podman"
  fi
fi

log "done in $(seconds_since "$t_script") s: image $image_ref, ID sha256:$image_id, archive $BERTH_TEST_IMAGE_ARCHIVE"
