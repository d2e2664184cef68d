use super::*;

fn origin() -> Origin {
    Origin {
        step_run_id: StepRunId::new(),
        attempt: 1,
        job_id: JobId::new(),
        worker_id: WorkerId::new(),
    }
}

#[test]
fn events_round_trip_with_version_and_type() {
    let ev = Event::LogBatch(LogBatch {
        origin: origin(),
        first_seq: 7,
        lines: vec![LogLine {
            ts: Utc::now(),
            stream: Stream::Stderr,
            text: "hello\tworld".into(),
        }],
    });
    let bytes = ev.encode();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["v"], 1);
    assert_eq!(v["type"], "LogBatch");
    assert!(v["step_run_id"].is_string());
    match Event::decode(&bytes).unwrap() {
        Event::LogBatch(b) => {
            assert_eq!(b.first_seq, 7);
            assert_eq!(b.lines[0].text, "hello\tworld");
        }
        other => panic!("wrong variant {other:?}"),
    }
}

#[test]
fn unknown_fields_are_ignored_and_bad_versions_refused() {
    let o = origin();
    let body = serde_json::json!({
        "v": 1, "type": "StepStarted", "step_run_id": o.step_run_id, "attempt": 1,
        "job_id": o.job_id, "worker_id": o.worker_id, "started_at": Utc::now(),
        "from_the_future": true
    });
    assert!(Event::decode(body.to_string().as_bytes()).is_ok());
    let mut bad = body.clone();
    bad["v"] = 2.into();
    assert!(matches!(
        Event::decode(bad.to_string().as_bytes()),
        Err(WireError::Version(Some(2)))
    ));
    assert!(matches!(
        Event::decode(b"not json"),
        Err(WireError::Malformed(_))
    ));
    let mut unknown = body;
    unknown["type"] = "Nope".into();
    assert!(matches!(
        Event::decode(unknown.to_string().as_bytes()),
        Err(WireError::UnknownType(_))
    ));
}

#[test]
fn artifact_chunks_carry_bytes_as_base64() {
    let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let ev = Event::ArtifactChunk(ArtifactChunk {
        origin: origin(),
        artifact: 1,
        name: "dist/app.tar.gz".into(),
        seq: 3,
        offset: 3 * ARTIFACT_CHUNK_BYTES as u64,
        data: data.clone(),
    });
    let bytes = ev.encode();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["type"], "ArtifactChunk");
    assert!(v["data"].is_string());
    match Event::decode(&bytes).unwrap() {
        Event::ArtifactChunk(c) => {
            assert_eq!(c.data, data);
            assert_eq!(c.seq, 3);
        }
        other => panic!("wrong variant {other:?}"),
    }
    // A largest chunk stays far below RabbitMQ's limits.
    let big = Event::ArtifactChunk(ArtifactChunk {
        origin: origin(),
        artifact: 0,
        name: "x".into(),
        seq: 0,
        offset: 0,
        data: vec![0xff; ARTIFACT_CHUNK_BYTES],
    });
    assert!(big.encode().len() < 100 * 1024);
}

#[test]
fn jobs_round_trip() {
    let job = Job {
        job_id: JobId::new(),
        task_id: TaskId::new(),
        task_name: "t".into(),
        step_run_id: StepRunId::new(),
        step_name: "s".into(),
        attempt: 2,
        syntax: Syntax::Python3,
        script: "print(1)".into(),
        variables: BTreeMap::from([("A".into(), "b".into())]),
        sensitive_names: vec![],
        timeout_secs: Some(5),
        cancel_grace_secs: Some(1),
        pool_name: None,
        exclusive: false,
        mutex: None,
        artifacts: vec!["dist/*.tar.gz".into()],
    };
    let back = Job::decode(&job.encode()).unwrap();
    assert_eq!(back.job_id, job.job_id);
    assert_eq!(back.syntax, Syntax::Python3);
    assert_eq!(back.artifacts, ["dist/*.tar.gz"]);
    assert!(Job::decode(b"{\"v\":1,\"type\":\"Job\"}").is_err());
}

#[test]
fn step_finished_carries_the_last_lines_and_refuses_more_than_it_counts() {
    let line = |t: &str| LogLine {
        ts: Utc::now(),
        stream: Stream::Stdout,
        text: t.into(),
    };
    let mut finished = StepFinished {
        origin: origin(),
        outcome: Outcome::Success,
        exit_code: Some(0),
        line_count: 5,
        error: None,
        finished_at: Utc::now(),
        artifacts: Vec::new(),
        lines: vec![line("four"), line("five")],
    };
    match Event::decode(&Event::StepFinished(finished.clone()).encode()).unwrap() {
        Event::StepFinished(f) => {
            assert_eq!(f.first_seq(), 3);
            assert_eq!(f.lines[1].text, "five");
        }
        other => panic!("wrong variant {other:?}"),
    }
    // Without lines the field is left out, as older agents send it.
    finished.lines.clear();
    let bytes = Event::StepFinished(finished.clone()).encode();
    assert!(!String::from_utf8_lossy(&bytes).contains("\"lines\""));
    assert!(Event::decode(&bytes).is_ok());
    // Three lines ending at line_count 2 would start before seq 0.
    finished.line_count = 2;
    finished.lines = vec![line("a"), line("b"), line("c")];
    assert!(matches!(
        Event::decode(&Event::StepFinished(finished).encode()),
        Err(WireError::Invalid(_))
    ));
}
