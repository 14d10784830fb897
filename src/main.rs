fn main() {
    if let Err(e) = saetrain::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
