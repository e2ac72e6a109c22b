
mod fares;
