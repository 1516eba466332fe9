//! `berth put` and `berth get` through the real binary against a real
//! controller: a tree with a file of several blocks goes up and comes back
//! byte-exact. Blocks are 64 KiB here (`--block-size`), so a 200 kB file
//! spans four of them without writing 64 MiB. Takes about 2 s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::TestCluster;
use rand::RngCore;

const BLOCK_SIZE: &str = "65536";

fn write_tree(root: &Path) -> Vec<u8> {
    let mut big = vec![0u8; 200_000];
    rand::thread_rng().fill_bytes(&mut big);
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    std::fs::write(root.join("small.txt"), "small\n").unwrap();
    std::fs::write(root.join("name with space:colon.txt"), "odd name\n").unwrap();
    std::fs::write(root.join("sub/big.bin"), &big).unwrap();
    std::fs::write(root.join("sub/zero.dat"), "").unwrap();
    big
}

/// Asserts that two trees hold the same directories and files, byte for
/// byte.
fn assert_same_tree(expected: &Path, actual: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(expected)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    names.sort();
    let mut actual_names: Vec<_> = std::fs::read_dir(actual)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    actual_names.sort();
    assert_eq!(names, actual_names, "entries of {}", actual.display());
    for name in names {
        let (left, right) = (expected.join(&name), actual.join(&name));
        if left.is_dir() {
            assert!(right.is_dir(), "{} is not a directory", right.display());
            assert_same_tree(&left, &right);
        } else {
            assert!(
                std::fs::read(&left).unwrap() == std::fs::read(&right).unwrap(),
                "{} differs from {}",
                right.display(),
                left.display()
            );
        }
    }
}

fn run_ok(cluster: &TestCluster, token: &str, args: &[&str]) -> String {
    let output = cluster.berth(token, args);
    assert!(
        output.status.success(),
        "berth {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn put_and_get_round_trip_a_tree() {
    let mut cluster = TestCluster::start("local");
    cluster.kill_dispatcher();
    let token = cluster.create_user("carol");
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    let big = write_tree(&tree);

    let tree_arg = tree.to_str().unwrap();
    let printed = run_ok(
        &cluster,
        &token,
        &["put", "--block-size", BLOCK_SIZE, tree_arg],
    );
    let fields: Vec<&str> = printed.split_whitespace().collect();
    assert_eq!(fields.len(), 2, "put printed {printed:?}");
    let (uuid, pdh) = (fields[0], fields[1]);
    assert!(uuid.contains("-4zz18-"), "{uuid}");

    let client = common::client(&cluster.api_url, &token);
    let collection = client.get_collection(uuid).await.unwrap();
    assert_eq!(collection.portable_data_hash, pdh);
    assert_eq!(collection.file_count, 4);
    let manifest = berth_core::manifest::Manifest::parse(&collection.manifest_text).unwrap();
    let big_file = manifest.file("tree/sub/big.bin").unwrap();
    assert_eq!(big_file.segments.len(), 4, "{}", collection.manifest_text);
    assert_eq!(big_file.size(), 200_000);

    // The whole collection, by UUID.
    let out = work.path().join("out");
    let out_arg = out.to_str().unwrap();
    run_ok(&cluster, &token, &["get", uuid, out_arg]);
    assert_same_tree(&tree, &out.join("tree"));

    // One file, by portable data hash.
    let single = work.path().join("big-copy.bin");
    run_ok(
        &cluster,
        &token,
        &["get", pdh, "tree/sub/big.bin", single.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&single).unwrap() == big,
        "the single file differs"
    );

    // A subtree.
    let subtree = work.path().join("subtree");
    run_ok(
        &cluster,
        &token,
        &["get", uuid, "tree/sub", subtree.to_str().unwrap()],
    );
    assert_same_tree(&tree.join("sub"), &subtree);

    // Existing files are kept unless --force.
    std::fs::write(out.join("tree/small.txt"), "changed\n").unwrap();
    let rejected = cluster.berth(&token, &["get", uuid, out_arg]);
    assert!(!rejected.status.success());
    let stderr = String::from_utf8_lossy(&rejected.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("tree/small.txt")).unwrap(),
        "changed\n"
    );
    run_ok(&cluster, &token, &["get", "--force", uuid, out_arg]);
    assert_same_tree(&tree, &out.join("tree"));

    // A symbolic link at the destination does not lead the writes out.
    let trap = work.path().join("trap");
    let outside = work.path().join("outside");
    std::fs::create_dir_all(&trap).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, trap.join("tree")).unwrap();
    let trapped = cluster.berth(&token, &["get", uuid, trap.to_str().unwrap()]);
    assert!(!trapped.status.success());
    let stderr = String::from_utf8_lossy(&trapped.stderr);
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // Another user reaches neither the collection nor its blocks.
    let other = cluster.create_user("mallory");
    let denied = cluster.berth(
        &other,
        &["get", uuid, work.path().join("stolen").to_str().unwrap()],
    );
    assert!(!denied.status.success());
    assert!(!work.path().join("stolen/tree").exists());
}
