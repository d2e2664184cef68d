use super::*;

fn parse(text: &str) -> Process {
    Process::from_toml(text).unwrap()
}

#[test]
fn a_good_process_passes() {
    let p = parse(
        r#"
name = "web"
[variables]
Env = "staging"
Port = 8080
Pw = { value = "s3cr3t-pw", sensitive = true }
[[steps]]
name = "build"
script = "echo #{Env} #{Port} #{Gantry.Task.Id}"
[[steps]]
name = "deploy"
syntax = "python3"
script = "print('#{Steps.build.Output.version}')"
"#,
    );
    p.validate().unwrap();
    assert_eq!(p.variables["Port"].value(), "8080");
    assert!(p.variables["Pw"].is_sensitive());
}

#[test]
fn artifact_globs_are_relative_and_valid() {
    let ok = parse(
        "name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"true\"\nartifacts = [\"dist/*.tar.gz\", \"reports/**/*.xml\", \"out.bin\"]\n",
    );
    ok.validate().unwrap();
    for bad in ["/etc/passwd", "../x", "dist/../../x", "", "a[", "  "] {
        let e = check_artifact_globs(&[bad.to_owned()]).unwrap_err();
        assert!(!e.is_empty(), "{bad:?}");
    }
    let p =
        parse("name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"true\"\nartifacts = [\"/abs\"]\n");
    assert_eq!(p.validate().unwrap_err().field, "steps[0].artifacts");
}

#[test]
fn timeouts_are_bounded_and_nul_is_refused_in_toml() {
    let step = |extra: &str| {
        parse(&format!(
            "name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"true\"\nmutex = \"m\"\n{extra}\n"
        ))
    };
    step("timeout_secs = 604800\nmutex_timeout_secs = 1")
        .validate()
        .unwrap();
    for (extra, field) in [
        ("timeout_secs = 604801", "steps[0].timeout_secs"),
        ("timeout_secs = 0", "steps[0].timeout_secs"),
        (
            "mutex_timeout_secs = 100000000000000000",
            "steps[0].mutex_timeout_secs",
        ),
        ("mutex_timeout_secs = 0", "steps[0].mutex_timeout_secs"),
    ] {
        assert_eq!(step(extra).validate().unwrap_err().field, field, "{extra}");
    }
    let p = parse("name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"echo \\u0000\"\n");
    assert_eq!(p.validate().unwrap_err().field, "steps[0].script");
}

#[test]
fn problems_name_their_field() {
    let cases = [
        (
            r#"name = "x"
steps = []"#,
            "steps",
        ),
        (
            r#"name = "x"
[[steps]]
name = "a"
"#,
            "steps[0].script",
        ),
        (
            r#"name = "x"
[[steps]]
name = "a b"
script = "true""#,
            "steps[0].name",
        ),
        (
            r#"name = "x"
[[steps]]
name = "a"
script = "echo #{Nope}""#,
            "steps[0].script",
        ),
        (
            r#"name = "x"
[[steps]]
name = "a"
script = "true"
[[steps]]
name = "a"
script = "true""#,
            "steps[1].name",
        ),
        (
            r#"name = "x"
[variables]
P = { value = "abc", sensitive = true }
[[steps]]
name = "a"
script = "true""#,
            "variables.P",
        ),
        (
            r#"name = "x"
[[steps]]
name = "a"
script = "true"
[[steps]]
name = "b"
parallel = true
script = "true"
[[steps]]
name = "c"
parallel = true
script = "echo #{Steps.b.Output.v}""#,
            "steps[2].script",
        ),
        (
            r#"name = "x"
[[steps]]
name = "a"
retries = 9
script = "true""#,
            "steps[0].retries",
        ),
    ];
    for (text, field) in cases {
        let err = parse(text).validate().unwrap_err();
        assert_eq!(err.field, field, "{text}\n=> {err}");
    }
}

#[test]
fn variable_shapes_are_explained() {
    let bad = Process::from_toml(
        "name = \"x\"\n[variables]\nA = [1, 2]\n[[steps]]\nname = \"a\"\nscript = \"true\"\n",
    )
    .unwrap_err();
    assert!(bad.message.contains("a variable is a string"), "{bad}");
    let bad = Process::from_toml(
        "name = \"x\"\n[variables]\nA = { value = 3 }\n[[steps]]\nname = \"a\"\nscript = \"true\"\n",
    )
    .unwrap_err();
    assert!(bad.message.contains("`value` must be a string"), "{bad}");
}

#[test]
fn unknown_fields_are_refused() {
    let err = Process::from_toml(
        r#"name = "x"
[[steps]]
name = "a"
scrpit = "true""#,
    )
    .unwrap_err();
    assert!(err.message.contains("scrpit"), "{err}");
}

#[test]
fn groups_follow_parallel_flags() {
    assert_eq!(
        group_ranges([false, true, true, false, false, true]),
        vec![0..3, 3..4, 4..6]
    );
}
