#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tidemark_repo::fuzzing::index_json(data));
