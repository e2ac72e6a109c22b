//! `station`: a complete local station in one command (see the crate documentation), and the
//! entry point of each of its services (`station controller run --config …`).

fn main() -> anyhow::Result<()> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(service) = args.get(1).and_then(|a| a.to_str()).filter(|a| station::SERVICES.contains(a)) {
        let service = service.to_owned();
        // The service sees itself as the program: `controller run --config …`.
        args.remove(0);
        return station::run_service(&service, args);
    }
    station::up::main(args)
}
