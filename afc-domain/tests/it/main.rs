mod ledger;
mod qr;
