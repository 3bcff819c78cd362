fn main() {
    eprintln!("loadtest: not built yet; see the loadtest issue");
    std::process::exit(2);
}
