//! `controller run --config FILE [--bootstrap]`: one station controller node (see `controller::cli`).

fn main() -> anyhow::Result<()> {
    controller::cli::main(std::env::args_os())
}
