//! `plc-sim`: a simulated gate PLC on Modbus TCP (see `gate_agent::cli::plc_sim`).

fn main() -> anyhow::Result<()> {
    gate_agent::cli::plc_sim(std::env::args_os())
}
