use super::*;

fn only_stage(text: &str) -> Stage {
    let df = parse(text).unwrap();
    assert_eq!(df.stages.len(), 1, "{df:?}");
    df.stages.into_iter().next().unwrap()
}

fn kinds(text: &str) -> Vec<InstructionKind> {
    only_stage(text)
        .instructions
        .into_iter()
        .map(|i| i.kind)
        .collect()
}

fn one(line: &str) -> InstructionKind {
    let mut k = kinds(&format!("FROM scratch\n{line}\n"));
    assert_eq!(k.len(), 1, "{k:?}");
    k.remove(0)
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn from_forms() {
    let df =
        parse("FROM busybox\nFROM --platform=linux/amd64 alpine:3 AS Build\nFROM build\n").unwrap();
    assert_eq!(df.stages.len(), 3);
    assert_eq!(df.stages[0].base, "busybox");
    assert_eq!(df.stages[0].name, None);
    assert_eq!(df.stages[0].line, 1);
    assert_eq!(df.stages[1].name.as_deref(), Some("build"));
    assert_eq!(df.stages[1].platform.as_deref(), Some("linux/amd64"));
    assert_eq!(df.stages[1].base, "alpine:3");
    assert_eq!(df.stages[2].base, "build");
    assert_eq!(df.stages[2].line, 3);
    assert_eq!(only_stage("from scratch as x").name.as_deref(), Some("x"));
}

#[test]
fn from_errors() {
    for (text, want) in [
        (
            "FROM",
            "Dockerfile parse error line 1: FROM requires either one or three arguments",
        ),
        (
            "FROM a b",
            "Dockerfile parse error line 1: FROM requires either one or three arguments",
        ),
        (
            "FROM a AS",
            "Dockerfile parse error line 1: FROM requires either one or three arguments",
        ),
        (
            "FROM a IS b",
            "Dockerfile parse error line 1: FROM requires either one or three arguments",
        ),
        (
            "FROM a AS 1x",
            "Dockerfile parse error line 1: invalid name for build stage: \"1x\", name can't \
             start with a number or contain symbols",
        ),
        (
            "FROM --foo=bar a",
            "Dockerfile parse error line 1: unknown flag: --foo",
        ),
    ] {
        assert_eq!(err(text), want, "{text}");
    }
}

#[test]
fn args_before_from_and_no_stage() {
    let df = parse("ARG V=1\nARG A B=2\nFROM busybox:${V}\nARG V\n").unwrap();
    assert_eq!(
        df.args_before_from,
        vec![
            Arg {
                name: "V".into(),
                default: Some("1".into())
            },
            Arg {
                name: "A".into(),
                default: None
            },
            Arg {
                name: "B".into(),
                default: Some("2".into())
            },
        ]
    );
    assert_eq!(df.stages[0].base, "busybox:${V}");
    assert_eq!(
        df.stages[0].instructions[0].kind,
        InstructionKind::Arg(vec![Arg {
            name: "V".into(),
            default: None
        }])
    );
    assert_eq!(
        err("ARG a\nRUN true\nFROM x"),
        "Dockerfile parse error line 2: no build stage in current context"
    );
    assert_eq!(
        err("ARG a\n"),
        "No image was generated. Is your Dockerfile empty?"
    );
    assert_eq!(err(""), "file with no instructions");
    assert_eq!(err("# just a comment\n\n"), "file with no instructions");
    assert_eq!(
        err("FROM x\nARG =v"),
        "Dockerfile parse error line 2: ARG names can not be blank"
    );
    assert_eq!(
        err("FROM x\nARG"),
        "Dockerfile parse error line 2: ARG requires at least one argument"
    );
}

#[test]
fn keywords_are_case_insensitive_and_unknown_fails() {
    assert_eq!(
        kinds("from x\nrun echo hi\nWorkDir /a"),
        vec![
            InstructionKind::Run {
                args: ShellOrExec::Shell("echo hi".into())
            },
            InstructionKind::Workdir("/a".into()),
        ]
    );
    assert_eq!(
        err("FROM x\n\nFOO bar"),
        "Dockerfile parse error line 3: unknown instruction: FOO"
    );
    assert_eq!(
        err("FROM x\nrunn true"),
        "Dockerfile parse error line 2: unknown instruction: RUNN"
    );
}

#[test]
fn run_cmd_entrypoint_forms() {
    assert_eq!(
        one("RUN [\"echo\", \"a b\"]"),
        InstructionKind::Run {
            args: ShellOrExec::Exec(strs(&["echo", "a b"]))
        }
    );
    // Not valid JSON: the shell form, verbatim.
    assert_eq!(
        one("RUN [\"echo\", 'a']"),
        InstructionKind::Run {
            args: ShellOrExec::Shell("[\"echo\", 'a']".into())
        }
    );
    assert_eq!(
        one("CMD [\"a\"]  "),
        InstructionKind::Cmd(ShellOrExec::Exec(strs(&["a"])))
    );
    assert_eq!(
        one("CMD echo $HOME"),
        InstructionKind::Cmd(ShellOrExec::Shell("echo $HOME".into()))
    );
    assert_eq!(
        one("ENTRYPOINT []"),
        InstructionKind::Entrypoint(ShellOrExec::Exec(vec![]))
    );
    assert_eq!(
        one("ENTRYPOINT exec top -b"),
        InstructionKind::Entrypoint(ShellOrExec::Shell("exec top -b".into()))
    );
    assert_eq!(
        err("FROM x\nCMD [\"a\", 1]"),
        "Dockerfile parse error line 2: when using JSON array syntax, arrays must be comprised \
         of strings only"
    );
    assert_eq!(
        ShellOrExec::Shell("echo hi".into()).argv(&strs(&["/bin/sh", "-c"])),
        strs(&["/bin/sh", "-c", "echo hi"])
    );
}

#[test]
fn run_flags_berth_refuses() {
    for flag in [
        "--mount=type=cache,target=/x",
        "--network=none",
        "--security=insecure",
    ] {
        let name = flag[2..].split('=').next().unwrap();
        assert_eq!(
            err(&format!("FROM x\nRUN {flag} true")),
            format!(
                "Dockerfile parse error line 2: RUN --{name} is not supported by berth's \
                 classic builder"
            )
        );
    }
    assert_eq!(
        err("FROM x\nRUN --foo true"),
        "Dockerfile parse error line 2: unknown flag: --foo"
    );
}

#[test]
fn copy_and_add() {
    assert_eq!(
        one("COPY a b /dst/"),
        InstructionKind::Copy {
            srcs: strs(&["a", "b"]),
            dest: "/dst/".into(),
            from: None,
            chown: None,
            chmod: None,
        }
    );
    assert_eq!(
        one("COPY --from=build --chown=1:2 --chmod=644 [\"a file\", \"/d\"]"),
        InstructionKind::Copy {
            srcs: strs(&["a file"]),
            dest: "/d".into(),
            from: Some("build".into()),
            chown: Some("1:2".into()),
            chmod: Some("644".into()),
        }
    );
    assert_eq!(
        one("ADD --chown=\"u:g\" x.tar /"),
        InstructionKind::Add {
            srcs: strs(&["x.tar"]),
            dest: "/".into(),
            chown: Some("u:g".into()),
            chmod: None,
        }
    );
    for (line, want) in [
        (
            "COPY a",
            "COPY requires at least two arguments, but only one was provided. Destination \
             could not be determined",
        ),
        (
            "ADD",
            "ADD requires at least two arguments, but only one was provided. Destination \
             could not be determined",
        ),
        ("ADD --from=x a b", "unknown flag: --from"),
        (
            "COPY --link a b",
            "COPY --link is not supported by berth's classic builder",
        ),
        (
            "COPY --parents a b",
            "COPY --parents is not supported by berth's classic builder",
        ),
        (
            "ADD --link a b",
            "ADD --link is not supported by berth's classic builder",
        ),
        (
            "ADD --checksum=sha256:x a b",
            "ADD --checksum is not supported by berth's classic builder",
        ),
        ("COPY --chown a b", "missing a value on flag: --chown"),
        (
            "COPY --from=a --from=b a b",
            "duplicate flag specified: --from",
        ),
    ] {
        assert_eq!(
            err(&format!("FROM x\n{line}")),
            format!("Dockerfile parse error line 2: {want}")
        );
    }
}

#[test]
fn env_and_label_forms() {
    assert_eq!(
        one("ENV PATH /usr/bin:$PATH"),
        InstructionKind::Env(vec![("PATH".into(), "/usr/bin:$PATH".into())])
    );
    assert_eq!(
        one("ENV a b c"),
        InstructionKind::Env(vec![("a".into(), "b c".into())])
    );
    assert_eq!(
        one("ENV a=1 b=\"two words\" c='x y' d=e\\ f"),
        InstructionKind::Env(vec![
            ("a".into(), "1".into()),
            ("b".into(), "\"two words\"".into()),
            ("c".into(), "'x y'".into()),
            ("d".into(), "e\\ f".into()),
        ])
    );
    assert_eq!(
        one("ENV a="),
        InstructionKind::Env(vec![("a".into(), "".into())])
    );
    assert_eq!(
        one("LABEL \"com.example\"=\"v 1\" other=2"),
        InstructionKind::Label(vec![
            ("\"com.example\"".into(), "\"v 1\"".into()),
            ("other".into(), "2".into()),
        ])
    );
    for (line, want) in [
        ("ENV", "ENV requires at least one argument"),
        ("ENV a", "ENV must have two arguments"),
        (
            "ENV a=b c",
            "Syntax error - can't find = in \"c\". Must be of the form: name=value",
        ),
        ("ENV =b", "ENV names can not be blank"),
        ("LABEL", "LABEL requires at least one argument"),
        ("LABEL x", "LABEL must have two arguments"),
    ] {
        assert_eq!(
            err(&format!("FROM x\n{line}")),
            format!("Dockerfile parse error line 2: {want}")
        );
    }
}

#[test]
fn simple_instructions() {
    assert_eq!(
        one("EXPOSE 8080 80/udp 443"),
        InstructionKind::Expose(strs(&["443", "80/udp", "8080"]))
    );
    assert_eq!(
        one("VOLUME /a /b"),
        InstructionKind::Volume(strs(&["/a", "/b"]))
    );
    assert_eq!(
        one("VOLUME [\"/a b\"]"),
        InstructionKind::Volume(strs(&["/a b"]))
    );
    assert_eq!(one("USER app:app"), InstructionKind::User("app:app".into()));
    assert_eq!(one("WORKDIR /a b"), InstructionKind::Workdir("/a b".into()));
    assert_eq!(
        one("STOPSIGNAL SIGKILL"),
        InstructionKind::StopSignal("SIGKILL".into())
    );
    assert_eq!(
        one("MAINTAINER Jane <j@x>"),
        InstructionKind::Maintainer("Jane <j@x>".into())
    );
    assert_eq!(
        one("SHELL [\"/bin/bash\", \"-c\"]"),
        InstructionKind::Shell(strs(&["/bin/bash", "-c"]))
    );
    for (line, want) in [
        ("EXPOSE", "EXPOSE requires at least one argument"),
        ("VOLUME", "VOLUME requires at least one argument"),
        (
            "VOLUME [\"\"]",
            "VOLUME specified can not be an empty string",
        ),
        ("USER", "USER requires exactly one argument"),
        ("WORKDIR", "WORKDIR requires exactly one argument"),
        ("STOPSIGNAL", "STOPSIGNAL requires exactly one argument"),
        ("MAINTAINER", "MAINTAINER requires exactly one argument"),
        (
            "SHELL /bin/sh -c",
            "SHELL requires the arguments to be in JSON form",
        ),
        ("SHELL []", "SHELL requires at least one argument"),
        ("SHELL", "SHELL requires at least one argument"),
        ("USER --x=1 a", "unknown flag: --x"),
    ] {
        assert_eq!(
            err(&format!("FROM x\n{line}")),
            format!("Dockerfile parse error line 2: {want}")
        );
    }
}

#[test]
fn healthcheck() {
    assert_eq!(
        one("HEALTHCHECK NONE"),
        InstructionKind::Healthcheck(HealthConfig {
            test: strs(&["NONE"]),
            ..HealthConfig::default()
        })
    );
    assert_eq!(
        one(
            "HEALTHCHECK --interval=5s --timeout=1m30s --start-period=100ms --start-interval=1s --retries=3 CMD curl -f http://x/ || exit 1"
        ),
        InstructionKind::Healthcheck(HealthConfig {
            test: strs(&["CMD-SHELL", "curl -f http://x/ || exit 1"]),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(90),
            start_period: Duration::from_millis(100),
            start_interval: Duration::from_secs(1),
            retries: 3,
        })
    );
    assert_eq!(
        one("healthcheck cmd [\"/bin/check\", \"-q\"]"),
        InstructionKind::Healthcheck(HealthConfig {
            test: strs(&["CMD", "/bin/check", "-q"]),
            ..HealthConfig::default()
        })
    );
    for (line, want) in [
        ("HEALTHCHECK", "HEALTHCHECK requires at least one argument"),
        ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
        ("HEALTHCHECK --interval=5s NONE", "unknown flag: --interval"),
        (
            "HEALTHCHECK FOO x",
            "Unknown type \"FOO\" in HEALTHCHECK (try CMD)",
        ),
        ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
        (
            "HEALTHCHECK CMD []",
            "Missing command after HEALTHCHECK CMD",
        ),
        (
            "HEALTHCHECK --interval=1ns CMD x",
            "Interval \"interval\" cannot be less than 1ms",
        ),
        (
            "HEALTHCHECK --timeout=abc CMD x",
            "time: invalid duration \"abc\"",
        ),
        (
            "HEALTHCHECK --timeout=5 CMD x",
            "time: missing unit in duration \"5\"",
        ),
        (
            "HEALTHCHECK --retries=-1 CMD x",
            "--retries cannot be negative (-1)",
        ),
        (
            "HEALTHCHECK --retries=x CMD x",
            "strconv.ParseInt: parsing \"x\": invalid syntax",
        ),
    ] {
        assert_eq!(
            err(&format!("FROM x\n{line}")),
            format!("Dockerfile parse error line 2: {want}")
        );
    }
    // Zero means "inherit".
    assert_eq!(
        one("HEALTHCHECK --interval=0s CMD x"),
        InstructionKind::Healthcheck(HealthConfig {
            test: strs(&["CMD-SHELL", "x"]),
            ..HealthConfig::default()
        })
    );
}

#[test]
fn go_durations() {
    for (s, nanos) in [
        ("0", 0u64),
        ("1ns", 1),
        ("1.5s", 1_500_000_000),
        ("2us", 2_000),
        ("3µs", 3_000),
        ("1h2m3s", 3_723_000_000_000),
        ("+10ms", 10_000_000),
    ] {
        assert_eq!(
            parse_go_duration(s).unwrap(),
            Duration::from_nanos(nanos),
            "{s}"
        );
    }
    for s in ["", "-1s", "1x", "s", "."] {
        assert!(parse_go_duration(s).is_err(), "{s}");
    }
}

#[test]
fn onbuild() {
    let InstructionKind::Onbuild(trigger) = one("ONBUILD  RUN echo \"hi\"") else {
        panic!()
    };
    assert_eq!(trigger.original, "RUN echo \"hi\"");
    assert_eq!(
        trigger.kind,
        InstructionKind::Run {
            args: ShellOrExec::Shell("echo \"hi\"".into())
        }
    );
    let InstructionKind::Onbuild(trigger) = one("onbuild copy --chown=1 a /b") else {
        panic!()
    };
    assert_eq!(trigger.original, "copy --chown=1 a /b");
    for (line, want) in [
        ("ONBUILD", "ONBUILD requires at least one argument"),
        (
            "ONBUILD ONBUILD RUN x",
            "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
        ),
        ("ONBUILD FROM x", "FROM isn't allowed as an ONBUILD trigger"),
        (
            "ONBUILD maintainer x",
            "MAINTAINER isn't allowed as an ONBUILD trigger",
        ),
        ("ONBUILD FOO x", "unknown instruction: FOO"),
    ] {
        assert_eq!(
            err(&format!("FROM x\n{line}")),
            format!("Dockerfile parse error line 2: {want}")
        );
    }
}

#[test]
fn continuations_comments_and_empty_lines() {
    let stage = only_stage(
        "FROM x\n# comment\nRUN a \\\n  b \\\n# inner comment\n\n  c\n\n  RUN   d  \nCMD e\\\n",
    );
    let lines: Vec<(usize, &str)> = stage
        .instructions
        .iter()
        .map(|i| (i.line, i.original.as_str()))
        .collect();
    assert_eq!(
        lines,
        vec![(3, "RUN a   b   c"), (9, "RUN   d"), (10, "CMD e")]
    );
    let df = parse("FROM x\nRUN a \\\n\n b").unwrap();
    assert_eq!(df.warnings.len(), 2, "{:?}", df.warnings);
    assert!(df.warnings[0].starts_with("[WARNING]: Empty continuation line found in:"));
    // A continuation with trailing spaces after the escape, and CRLF line ends.
    assert_eq!(
        kinds("FROM x\r\nRUN a \\  \r\n b\r\n"),
        vec![InstructionKind::Run {
            args: ShellOrExec::Shell("a  b".into())
        }]
    );
    // Line numbers count every physical line.
    assert_eq!(
        err("FROM x\nRUN a \\\n b\nNOPE"),
        "Dockerfile parse error line 4: unknown instruction: NOPE"
    );
}

#[test]
fn directives() {
    let df = parse("# escape=`\n# syntax=docker/dockerfile:1\nFROM x\nRUN a `\n  b\n").unwrap();
    assert_eq!(
        df.directives,
        Directives {
            escape: '`',
            syntax: Some("docker/dockerfile:1".into())
        }
    );
    assert_eq!(df.stages[0].instructions[0].original, "RUN a   b");
    // The default escape token is then literal.
    let df = parse("#escape = `\nFROM x\nRUN c:\\dir\\\n").unwrap();
    assert_eq!(
        df.stages[0].instructions[0].kind,
        InstructionKind::Run {
            args: ShellOrExec::Shell("c:\\dir\\".into())
        }
    );
    // Directives after an empty line, a comment or an instruction are plain comments.
    for text in [
        "\n# escape=`\nFROM x\nRUN a `\n",
        "# hello\n# escape=`\nFROM x\nRUN a `\n",
        "# unknown=1\n# escape=`\nFROM x\nRUN a `\n",
    ] {
        let df = parse(text).unwrap();
        assert_eq!(df.directives.escape, '\\', "{text:?}");
    }
    assert_eq!(
        parse("FROM x\n# escape=`\nRUN a\n")
            .unwrap()
            .directives
            .escape,
        '\\'
    );
    assert_eq!(
        err("# escape=x\nFROM x"),
        "Dockerfile parse error line 1: invalid escape token 'x' does not match ` or \\"
    );
    assert_eq!(
        err("# escape=`\n# ESCAPE=\\\nFROM x"),
        "Dockerfile parse error line 2: only one escape parser directive can be used"
    );
    // BOM on the first line.
    assert_eq!(
        parse("\u{feff}# escape=`\nFROM x")
            .unwrap()
            .directives
            .escape,
        '`'
    );
}

#[test]
fn parse_words_keeps_quotes() {
    for (input, want) in [
        ("a b", vec!["a", "b"]),
        ("a=\"b c\" d", vec!["a=\"b c\"", "d"]),
        ("a='b \\' c", vec!["a='b \\'", "c"]),
        ("a\\ b c", vec!["a\\ b", "c"]),
        ("\"\"", vec!["\"\""]),
        ("  ", vec![]),
    ] {
        assert_eq!(parse_words(input, '\\'), strs(&want), "{input:?}");
    }
}

#[test]
fn parse_instruction_single_line() {
    let i = parse_instruction("CMD [\"x\"]", '\\').unwrap();
    assert_eq!(
        i.kind,
        InstructionKind::Cmd(ShellOrExec::Exec(strs(&["x"])))
    );
    assert!(parse_instruction("FROM x", '\\').is_err());
    assert!(parse_instruction("CMD a\nCMD b", '\\').is_err());
    assert_eq!(
        InstructionKind::Maintainer("x".into()).keyword(),
        "MAINTAINER"
    );
}

#[test]
fn moby_docker_testfile_shapes() {
    // Shapes from moby's parser testfile "docker": tabs as separators, tab-indented
    // continuations (their tabs kept), old-form ENV/LABEL, comments between instructions.
    let text = "# comment\n#\n\nFROM\tubuntu:14.04\nLABEL\tmaintainer\tTianon Gravi <admwiggin@gmail.com> (@tianon)\n\n\
        # Packaged dependencies\nRUN\tapt-get update && install -yq \\\n\tapt-utils \\\n\ts3cmd=1.1.0* \\\n\t--no-install-recommends\n\
        ENV\tPATH\t/usr/local/go/bin:$PATH\nENV\tDOCKER_CROSSPLATFORMS\t\\\n\tlinux/386 linux/arm \\\n\tdarwin/amd64\n\
        # (set an explicit GOARM of 5 for maximum compatibility)\nENV\tGOARM\t5\n\
        RUN\t/bin/echo -e '[default]\\naccess_key=$AWS_ACCESS_KEY' > /.s3cfg\n\
        VOLUME\t/var/lib/docker\nENTRYPOINT\t[\"hack/dind\"]\nCOPY\t.\t/go/src/github.com/docker/docker\n";
    let stage = only_stage(text);
    assert_eq!(stage.base, "ubuntu:14.04");
    assert_eq!(stage.line, 4);
    let kinds: Vec<InstructionKind> = stage.instructions.into_iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        vec![
        InstructionKind::Label(vec![(
            "maintainer".into(),
            "Tianon Gravi <admwiggin@gmail.com> (@tianon)".into()
        )]),
        InstructionKind::Run {
            args: ShellOrExec::Shell(
                "apt-get update && install -yq \tapt-utils \ts3cmd=1.1.0* \t--no-install-recommends"
                    .into()
            )
        },
        InstructionKind::Env(vec![("PATH".into(), "/usr/local/go/bin:$PATH".into())]),
        InstructionKind::Env(vec![(
            "DOCKER_CROSSPLATFORMS".into(),
            "linux/386 linux/arm \tdarwin/amd64".into()
        )]),
        InstructionKind::Env(vec![("GOARM".into(), "5".into())]),
        InstructionKind::Run {
            args: ShellOrExec::Shell(
                "/bin/echo -e '[default]\\naccess_key=$AWS_ACCESS_KEY' > /.s3cfg".into()
            )
        },
        InstructionKind::Volume(strs(&["/var/lib/docker"])),
        InstructionKind::Entrypoint(ShellOrExec::Exec(strs(&["hack/dind"]))),
        InstructionKind::Copy {
            srcs: strs(&["."]),
            dest: "/go/src/github.com/docker/docker".into(),
            from: None,
            chown: None,
            chmod: None,
        },
    ]
    );
}

#[test]
fn moby_health_testfile() {
    // moby's parser testfile "health", with the instruction-level verdicts.
    assert_eq!(
        err("FROM debian\nADD check.sh main.sh /app/\nCMD /app/main.sh\nHEALTHCHECK"),
        "Dockerfile parse error line 4: HEALTHCHECK requires at least one argument"
    );
    let hc = |line: &str| match one(line) {
        InstructionKind::Healthcheck(h) => h,
        other => panic!("{other:?}"),
    };
    let h =
        hc("HEALTHCHECK --interval=5s --timeout=3s --retries=3 \\\n  CMD /app/check.sh --quiet");
    assert_eq!(h.test, strs(&["CMD-SHELL", "/app/check.sh --quiet"]));
    assert_eq!(
        (h.interval, h.timeout, h.retries),
        (Duration::from_secs(5), Duration::from_secs(3), 3)
    );
    assert_eq!(
        err("FROM x\nHEALTHCHECK CMD"),
        "Dockerfile parse error line 2: Missing command after HEALTHCHECK CMD"
    );
    assert_eq!(
        hc("HEALTHCHECK   CMD   a b").test,
        strs(&["CMD-SHELL", "a b"])
    );
    assert_eq!(
        hc("HEALTHCHECK --timeout=3s CMD [\"foo\"]").test,
        strs(&["CMD", "foo"])
    );
    assert_eq!(
        err("FROM x\nHEALTHCHECK CONNECT TCP 7000"),
        "Dockerfile parse error line 2: Unknown type \"CONNECT\" in HEALTHCHECK (try CMD)"
    );
    let h =
        hc("HEALTHCHECK --start-period=0s --interval=5s --timeout=0s --retries=0 CMD [\"foo\"]");
    assert_eq!(
        (h.start_period, h.interval, h.timeout, h.retries),
        (Duration::ZERO, Duration::from_secs(5), Duration::ZERO, 0)
    );
}
