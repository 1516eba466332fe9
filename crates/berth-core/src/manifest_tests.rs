//! Manifest tests. The expected normalised texts and portable data hashes
//! were produced by the Arvados Python SDK 3.2.1
//! (`Collection(text).manifest_text(normalize=True)` and
//! `portable_data_hash()`), so they pin Berth to Arvados's behaviour.

use super::*;

const FOO: &str = "acbd18db4cc2f85cedef654fccc4a4d8+3";
const BAR: &str = "37b51d194a7513e45b56f6524f2d51f2+3";

fn parse(text: &str) -> Manifest {
    Manifest::parse(text).unwrap_or_else(|err| panic!("{text:?}: {err}"))
}

#[test]
fn empty_collection_has_known_pdh() {
    let manifest = parse("");
    assert!(manifest.files().is_empty());
    assert_eq!(manifest.to_text(), "");
    assert_eq!(manifest.portable_data_hash(), EMPTY_COLLECTION_PDH);
}

#[test]
fn single_file_matches_arvados() {
    let manifest = parse(". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:foo\n");
    assert_eq!(manifest.files().len(), 1);
    assert_eq!(manifest.files()[0].path, "foo");
    assert_eq!(manifest.files()[0].size(), 3);
    assert_eq!(
        manifest.portable_data_hash(),
        "1f4b0bc7583c2a7f9102c395f4ffc5e3+45"
    );
}

#[test]
fn escaped_names_are_decoded_and_reescaped() {
    let text = format!("./dir\\040one {BAR} {FOO} 3:3:z\\040file 0:3:a\\072c\n. {BAR} 0:3:bar\n");
    let manifest = parse(&text);
    let paths: Vec<&str> = manifest.files().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["dir one/z file", "dir one/a:c", "bar"]);
    assert_eq!(
        manifest.to_text(),
        format!(". {BAR} 0:3:bar\n./dir\\040one {BAR} {FOO} 0:3:a\\072c 3:3:z\\040file\n")
    );
    assert_eq!(
        manifest.portable_data_hash(),
        "3bda87f6b8ac41c02850122d53301e4e+153"
    );
}

#[test]
fn file_spanning_blocks_is_merged() {
    let manifest = parse(&format!(". {BAR} {FOO} 0:2:big 2:4:big 0:0:empty\n"));
    let big = manifest.file("big").unwrap();
    assert_eq!(big.size(), 6);
    assert_eq!(big.segments.len(), 2);
    assert_eq!(big.segments[0].locator.to_string(), BAR);
    assert_eq!((big.segments[0].offset, big.segments[0].length), (0, 3));
    assert_eq!(big.segments[1].locator.to_string(), FOO);
    assert_eq!((big.segments[1].offset, big.segments[1].length), (0, 3));
    assert_eq!(
        manifest.to_text(),
        format!(". {BAR} {FOO} 0:6:big 0:0:empty\n")
    );
    assert_eq!(
        manifest.portable_data_hash(),
        "17a087bcadb8b37322fb00f0f9bd9206+90"
    );
}

#[test]
fn subdirectories_become_streams() {
    let manifest = parse(&format!(". {FOO} 0:3:sub/deep/foo 0:0:sub/zero\n"));
    assert_eq!(
        manifest.to_text(),
        format!("./sub d41d8cd98f00b204e9800998ecf8427e+0 0:0:zero\n./sub/deep {FOO} 0:3:foo\n")
    );
    assert_eq!(
        manifest.portable_data_hash(),
        "ec7a1e8a58bdd607ac4105e57f26b168+104"
    );
}

#[test]
fn repeated_paths_concatenate() {
    let manifest = parse(&format!(". {BAR} {FOO} 3:3:b 0:3:a\n. {FOO} 0:3:a\n"));
    assert_eq!(manifest.file("a").unwrap().size(), 6);
    assert_eq!(manifest.to_text(), format!(". {BAR} {FOO} 0:6:a 3:3:b\n"));
    assert_eq!(
        manifest.portable_data_hash(),
        "9c01e0566bbe71646d8b2e578b4e286b+84"
    );
}

#[test]
fn hints_kept_and_stripped_for_pdh() {
    let text = format!(
        ". {BAR} {FOO}+K@zzzzz 0:6:ab 1:1:x\n./d d41d8cd98f00b204e9800998ecf8427e+0 0:0:\\056\n"
    );
    let manifest = parse(&text);
    assert_eq!(manifest.to_text(), text);
    assert!(manifest.directories().contains("d"));
    assert_eq!(
        manifest.portable_data_hash(),
        "702f3732293c06f88dadb3fa39b41604+133"
    );
}

#[test]
fn signatures_do_not_change_pdh() {
    let signed = parse(
        ". acbd18db4cc2f85cedef654fccc4a4d8+3+A1f4b0bc7583c2a7f9102c395f4ffc5e3e3fdd6f7@565f7801 0:3:foo\n",
    );
    assert_eq!(
        signed.portable_data_hash(),
        "1f4b0bc7583c2a7f9102c395f4ffc5e3+45"
    );
    let unsigned = signed.map_locators(Locator::without_signature);
    assert_eq!(unsigned.to_text(), format!(". {FOO} 0:3:foo\n"));
}

#[test]
fn segment_inside_a_block_keeps_offset() {
    let manifest = parse(&format!(". {BAR} {FOO} 2:2:mid\n"));
    let mid = manifest.file("mid").unwrap();
    assert_eq!(mid.segments.len(), 2);
    assert_eq!((mid.segments[0].offset, mid.segments[0].length), (2, 1));
    assert_eq!((mid.segments[1].offset, mid.segments[1].length), (0, 1));
    assert_eq!(manifest.to_text(), format!(". {BAR} {FOO} 2:2:mid\n"));
}

#[test]
fn invalid_manifests_name_line_and_token() {
    for (text, line, token, reason) in [
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:foo", 1, "", "newline"),
        ("\n", 1, "", "empty"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3  0:3:foo\n", 1, "", "double space"),
        ("foo acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:foo\n", 1, "foo", "start with ./"),
        ("./a/../b acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:foo\n", 1, "./a/../b", ". or .."),
        (". 0:3:foo\n", 1, "0:3:foo", "at least one block locator"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3\n", 1, ".", "at least one file segment"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:4:foo\n", 1, "0:4:foo", "past the stream"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:../etc/passwd\n", 1, "0:3:../etc/passwd", ". or .."),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:/abs\n", 1, "0:3:/abs", "empty component"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a\\04\n", 1, "0:3:a\\04", "three octal digits"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 x:3:foo\n", 1, "x:3:foo", "position"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3\n", 1, "0:3", "position:size:name"),
        (". acbd18db4cc2f85cedef654fccc4a4d8 0:3:foo\n", 1, "acbd18db4cc2f85cedef654fccc4a4d8", "size is missing"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a\tb\n", 1, "", "control"),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:foo\n. acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:..\n", 2, "0:3:..", ". or .."),
        (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:\\056\n", 1, "0:3:\\056", "size 0"),
    ] {
        let err = Manifest::parse(text).unwrap_err();
        assert_eq!(err.line, line, "{text:?}: {err}");
        assert_eq!(err.token, token, "{text:?}: {err}");
        assert!(err.reason.contains(reason), "{text:?}: {err}");
    }
}

#[test]
fn file_and_directory_of_one_path_rejected() {
    let err = Manifest::parse(&format!(". {FOO} 0:3:a 0:3:a/b\n")).unwrap_err();
    assert_eq!(err.token, "a");
    assert!(err.reason.contains("both a file and a directory"), "{err}");
}

#[test]
fn builder_writes_normalised_manifest() {
    let foo = Locator::parse(FOO).unwrap();
    let bar = Locator::parse(BAR).unwrap();
    let mut builder = ManifestBuilder::new();
    builder
        .add_file(
            "dir one/z file",
            vec![Segment {
                locator: foo.clone(),
                offset: 0,
                length: 3,
            }],
        )
        .unwrap();
    builder
        .add_file(
            "dir one/a:c",
            vec![Segment {
                locator: bar.clone(),
                offset: 0,
                length: 3,
            }],
        )
        .unwrap();
    builder
        .add_file(
            "bar",
            vec![Segment {
                locator: bar,
                offset: 0,
                length: 3,
            }],
        )
        .unwrap();
    let manifest = builder.finish().unwrap();
    assert_eq!(
        manifest.portable_data_hash(),
        "3bda87f6b8ac41c02850122d53301e4e+153"
    );
    assert_eq!(parse(&manifest.to_text()), manifest.clone().reparsed());
}

#[test]
fn builder_rejects_escaping_paths() {
    let mut builder = ManifestBuilder::new();
    for path in ["", "../x", "a/./b", "/abs", "a//b", "a/"] {
        assert!(builder.add_file(path, Vec::new()).is_err(), "{path:?}");
    }
}

#[test]
fn escape_round_trips_odd_names() {
    let name = "tab\there:colon\\back slash\nline";
    let escaped = escape_name(name);
    assert!(!escaped.contains([' ', '\t', '\n', ':']), "{escaped}");
    assert_eq!(unescape_name(&escaped).unwrap(), name);
}

#[test]
fn pdh_syntax_is_checked() {
    assert!(is_portable_data_hash(EMPTY_COLLECTION_PDH));
    assert!(!is_portable_data_hash("d41d8cd98f00b204e9800998ecf8427e"));
    assert!(!is_portable_data_hash("zzzzz-4zz18-012345678901234"));
    assert!(!is_portable_data_hash("d41d8cd98f00b204e9800998ecf8427e+"));
}

impl Manifest {
    /// Writes and parses the manifest again, so that file order is the
    /// normalised one.
    fn reparsed(self) -> Manifest {
        parse(&self.to_text())
    }
}
