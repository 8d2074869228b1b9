//! A short run of every fuzz target of what PostgreSQL hands us (WAL, BASE_BACKUP's tar, the
//! backup manifest) over its seed corpus and mutations of it (issue #15 point 14; the long
//! coverage-guided runs are under `fuzz/`, see docs/testing.md).

use tidemark_engine::postgres::fuzzing::TARGETS;
use tidemark_testkit::fuzz::smoke;

#[test]
fn every_parser_survives_its_corpus_and_mutations_of_it() {
    for (name, f) in TARGETS {
        smoke(name, *f, 200);
    }
}
