//! Populations: generated from the scenario, CSV export and import with
//! errors that name the line and the column.

use std::path::Path;

use smartmsg_simulator::{PopulationError, Scenario, SimPopulation};

fn small() -> Scenario {
    let mut s = Scenario::small();
    s.population.subscribers = 500;
    s.campaign.budget = 200;
    s
}

#[test]
fn generation_is_seeded_and_has_dormant_users() {
    let s = small();
    let a = SimPopulation::generate(&s).unwrap();
    let b = SimPopulation::generate(&s).unwrap();
    assert_eq!(a.candidates(), b.candidates());
    assert_eq!(a.len(), 500);
    assert!(
        a.non_reacting() > 20 && a.non_reacting() < 90,
        "{}",
        a.non_reacting()
    );
    let mut t = s;
    t.seed += 1;
    assert_ne!(
        SimPopulation::generate(&t).unwrap().candidates(),
        a.candidates()
    );
    // The oracle beats random; the random-first-batch oracle lies between.
    let (r, o) = (a.random_expected(200), a.oracle_expected(200));
    let m = a.oracle_after_random_batch(200, 34, 1);
    assert!(r < m && m < o, "{r} {m} {o}");
}

#[test]
fn csv_round_trips_exactly() {
    let pop = SimPopulation::generate(&small()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pop.csv");
    pop.write_csv(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("user_id,x_0,x_1,x_2,x_3,p_0,p_1,p_2\n"));
    let back = SimPopulation::from_csv(&path).unwrap();
    assert_eq!(back.candidates(), pop.candidates());
    for u in 0..pop.len() as u32 {
        for c in 0..3 {
            assert_eq!(back.probability(u, c), pop.probability(u, c));
        }
    }
    assert_eq!(back.non_reacting(), pop.non_reacting());
    // Writing it again gives the same bytes.
    let again = dir.path().join("again.csv");
    back.write_csv(&again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), text.into_bytes());
}

#[test]
fn sparse_user_ids_are_looked_up() {
    let csv = "user_id,x_0,p_0,p_1\n100,0.5,0.1,0.2\n7,-1,0,0.9\n";
    let pop = SimPopulation::read_csv(csv.as_bytes(), Path::new("m.csv")).unwrap();
    assert_eq!(pop.row_of(7), Some(1));
    assert_eq!(pop.row_of(8), None);
    assert_eq!(pop.probability(7, 1), 0.9);
    assert_eq!(pop.features(100), Some(&[0.5f32][..]));
}

fn read_err(csv: &str) -> PopulationError {
    SimPopulation::read_csv(csv.as_bytes(), Path::new("bad.csv")).unwrap_err()
}

#[test]
fn csv_errors_name_line_column_and_why() {
    match read_err("user_id,x_0,p_0\n1,0.5,0.1\n2,abc,0.1\n") {
        PopulationError::Record {
            line,
            column,
            name,
            reason,
            ..
        } => {
            assert_eq!((line, column, name.as_str()), (3, 2, "x_0"));
            assert!(reason.contains("not a number"), "{reason}");
        }
        e => panic!("{e}"),
    }
    match read_err("user_id,x_0,p_0\n1,0.5,1.5\n") {
        PopulationError::Record {
            line,
            column,
            reason,
            ..
        } => {
            assert_eq!((line, column), (2, 3));
            assert!(reason.contains("[0, 1]"), "{reason}");
        }
        e => panic!("{e}"),
    }
    match read_err("user_id,x_0,p_0\n1,0.5,0.1\n1,0.5,0.1\n") {
        PopulationError::Record { line, reason, .. } => {
            assert_eq!(line, 3);
            assert!(reason.contains("twice (first on line 2)"), "{reason}");
        }
        e => panic!("{e}"),
    }
    match read_err("user_id,x_0,p_0\n1,0.5\n") {
        PopulationError::Line { line, reason, .. } => {
            assert_eq!(line, 2);
            assert!(reason.contains("2 fields; the header has 3"), "{reason}");
        }
        e => panic!("{e}"),
    }
    match read_err("id,x_0,p_0\n") {
        PopulationError::Header { reason, .. } => assert!(reason.contains("user_id"), "{reason}"),
        e => panic!("{e}"),
    }
    match read_err("user_id,x_0,x_2,p_0\n") {
        PopulationError::Header { reason, .. } => {
            assert!(
                reason.contains("column 3") && reason.contains("x_1"),
                "{reason}"
            )
        }
        e => panic!("{e}"),
    }
    match read_err("user_id,x_0\n") {
        PopulationError::Header { reason, .. } => {
            assert!(reason.contains("0 probability columns"), "{reason}")
        }
        e => panic!("{e}"),
    }
    match read_err("user_id,x_0,p_0\n-4,0.5,0.1\n") {
        PopulationError::Record { reason, .. } => assert!(reason.contains("user id"), "{reason}"),
        e => panic!("{e}"),
    }
    assert!(matches!(
        read_err("user_id,x_0,p_0\n"),
        PopulationError::Shape(_)
    ));
}
