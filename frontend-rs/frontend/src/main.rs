fn main() { eprintln!("shoal-frontend: not built yet"); std::process::exit(2); }
