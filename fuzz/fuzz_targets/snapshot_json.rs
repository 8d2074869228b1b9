#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tidemark_repo::fuzzing::snapshot_json(data));
