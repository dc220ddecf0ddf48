#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ma_gateway_fuzz::vault(data));
