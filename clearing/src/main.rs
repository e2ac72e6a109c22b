//! `clearing-server`: the reference central clearing server (see `clearing::cli`).

fn main() -> anyhow::Result<()> {
    clearing::cli::main(std::env::args_os())
}
