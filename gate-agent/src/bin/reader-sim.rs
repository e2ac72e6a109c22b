//! `reader-sim`: a simulated card reader tapping a gate agent (see `gate_agent::cli::reader_sim`).

fn main() -> anyhow::Result<()> {
    gate_agent::cli::reader_sim(std::env::args_os())
}
