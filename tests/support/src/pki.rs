//! A test certificate authority generated at run time (no private key is committed): the CA
//! certificate and leaf certificates it signs, as PEM, for the TLS tests of the controller and
//! the gate agent.

/// A fresh self-signed CA whose key stays in memory.
pub struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

/// A leaf certificate and its private key, as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A CA with the common name `name` (none when `name` is empty).
    pub fn new(name: &str) -> Result<TestCa, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        if !name.is_empty() {
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
        }
        let cert = params.self_signed(&key)?;
        Ok(TestCa { key, cert })
    }

    /// The CA certificate, as PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA, with a fresh key.
    pub fn leaf(&self, names: &[&str]) -> Result<Leaf, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names)?.signed_by(&key, &self.cert, &self.key)?;
        Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}
