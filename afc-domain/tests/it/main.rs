
mod packages;
