"""A local GCS for tests: gcp-storage-emulator plus a TLS front for TF.

Every client is pointed at 127.0.0.1; nothing reaches real GCS.
- tensorstore (orbax's checkpoints): TENSORSTORE_GCS_HTTP_URL, its endpoint
  override, straight to the emulator.
- tf.io.gfile (and etils.epath, whose gs:// backend is tf.io.gfile when TF is
  installed; TFDS; tf.data): TF 2.21's GCS filesystem has no endpoint
  override (its URL base is compiled in), but it talks through libcurl, which
  honours HTTPS_PROXY, and it trusts CURL_CA_BUNDLE. So a CONNECT proxy on
  127.0.0.1 terminates TLS with a throw-away self-signed certificate for the
  Google API hosts and forwards each request to the emulator over plain HTTP,
  rewriting the emulator's http:// upload URLs to https:// on the way back.
- Both clients authenticate with GOOGLE_AUTH_TOKEN_FOR_TESTING, so neither
  looks for credentials or a metadata server.

Run alone (`python tests/gcs_emulator.py`) it prints the environment to export
and serves until interrupted.
"""
import http.client
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def make_certificate(directory: str) -> tuple[str, str]:
  """(cert.pem, key.pem): self-signed, valid for GOOGLE_HOSTS, via openssl."""
  cert, key = os.path.join(directory, 'cert.pem'), os.path.join(directory, 'key.pem')
  names = ','.join(f'DNS:{h}' for h in GOOGLE_HOSTS)
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
                  '-keyout', key, '-out', cert, '-days', '2', '-subj',
                  f'/CN={GOOGLE_HOSTS[0]}', '-addext', f'subjectAltName={names}'],
                 check=True, capture_output=True)
  return cert, key


class _Forward(http.server.BaseHTTPRequestHandler):
  """One decrypted request -> the emulator; http:// links -> https://."""
  protocol_version = 'HTTP/1.1'   # keep-alive, and answers Expect: 100-continue
  emulator_port = 0

  def _forward(self):
    body = self._body()
    if os.environ.get('GCS_PROXY_DEBUG'):
      sys.stderr.write(f'>> {self.command} {self.path} {dict(self.headers)} {body!r:.200}\n')
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ('expect', 'connection', 'proxy-connection',
                                    'transfer-encoding', 'content-length')}
    if body is not None or self.command in ('POST', 'PUT', 'PATCH'):
      headers['Content-Length'] = str(len(body or b''))
    upstream = http.client.HTTPConnection('127.0.0.1', self.emulator_port, timeout=60)
    upstream.request(self.command, self.path, body=body, headers=headers)
    response = upstream.getresponse()
    data = response.read()
    host = self.headers.get('Host', '')
    data = data.replace(f'http://{host}'.encode(), f'https://{host}'.encode())
    self.send_response(response.status, response.reason)
    for name, value in response.getheaders():
      if name.lower() in ('content-length', 'transfer-encoding', 'connection'):
        continue
      if name.lower() == 'location':
        value = value.replace('http://', 'https://', 1)
      self.send_header(name, value)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)
    upstream.close()

  def _body(self):
    # TF's uploads say both chunked and Content-Length; chunked wins (RFC 9112).
    if 'chunked' in self.headers.get('Transfer-Encoding', ''):
      parts = []
      while True:
        size = int(self.rfile.readline().split(b';')[0], 16)
        if not size:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass   # trailers
          return b''.join(parts)
        parts.append(self.rfile.read(size))
        self.rfile.readline()
    length = self.headers.get('Content-Length')
    return None if length is None else self.rfile.read(int(length))

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def log_message(self, format, *args):
    if os.environ.get('GCS_PROXY_DEBUG'):
      sys.stderr.write(f'{type(self).__name__}: {format % args}\n')


class _Connect(http.server.BaseHTTPRequestHandler):
  """HTTPS_PROXY endpoint: CONNECT to a Google API host, then TLS to _Forward."""
  context: ssl.SSLContext = None
  forward = _Forward

  def do_CONNECT(self):
    host = self.path.rsplit(':', 1)[0].rstrip('.')
    if host not in GOOGLE_HOSTS:   # never tunnel anywhere else
      self.send_error(403, f'test proxy: {host} is not a GCS host')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    tls = self.context.wrap_socket(self.connection, server_side=True)
    self.forward(tls, self.client_address, self.server)
    self.close_connection = True

  def log_message(self, format, *args):
    if os.environ.get('GCS_PROXY_DEBUG'):
      sys.stderr.write(f'{type(self).__name__}: {format % args}\n')


def _emulator(port: int, bucket: str):
  """gcp-storage-emulator in this process, in memory, serving `bucket`.

  Patched for two gaps: an upload with an empty body (TF's directory marker
  `dir/`) crashes its media handler (len(None)): it gets b'' instead; and a
  download lacks the x-goog-generation header that tensorstore's conditional
  writes (orbax's OCDBT manifest) read: it is added from the object.
  """
  import logging
  from gcp_storage_emulator import server, storage
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
  read_data, get_file_obj = server._read_data, storage.Storage.get_file_obj
  write_file, last = server.Response.write_file, threading.local()

  def read_data_or_empty(handler, query):
    data = read_data(handler, query)
    return b'' if data is None and 'uploadType' in query else data

  def remembered_obj(self, *args, **kwargs):
    last.obj = get_file_obj(self, *args, **kwargs)
    return last.obj

  def write_file_with_generation(self, content, *args, **kwargs):
    obj = getattr(last, 'obj', None)
    if obj is not None:
      self['x-goog-generation'] = obj['generation']
      self['x-goog-metageneration'] = obj['metageneration']
      last.obj = None
    return write_file(self, content, *args, **kwargs)

  server._read_data = read_data_or_empty
  storage.Storage.get_file_obj = remembered_obj
  server.Response.write_file = write_file_with_generation
  emulator = server.create_server('127.0.0.1', port, in_memory=True,
                                  default_bucket=bucket)
  emulator.start()
  return emulator


class LocalGCS:
  """The emulator (a subprocess) and the TLS proxy (a thread), on 127.0.0.1.

  env: the variables that point TF, tensorstore and the Python clients at it.
  """

  def __init__(self, directory: str, bucket: str = 'test-bucket'):
    self.port, self.proxy_port = free_port(), free_port()
    self.emulator = _emulator(self.port, bucket)
    cert, key = make_certificate(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    forward = type('Forward', (_Forward,), {'emulator_port': self.port})
    handler = type('Connect', (_Connect,), {'context': context, 'forward': forward})
    self.proxy = http.server.ThreadingHTTPServer(('127.0.0.1', self.proxy_port), handler)
    self.proxy.daemon_threads = True
    threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
    self.url = f'http://127.0.0.1:{self.port}'
    self.env = {
        'STORAGE_EMULATOR_HOST': self.url,          # google-cloud-storage, gcsfs
        'TENSORSTORE_GCS_HTTP_URL': self.url,       # orbax's tensorstore
        'HTTPS_PROXY': f'http://127.0.0.1:{self.proxy_port}',   # tf.io.gfile
        'https_proxy': f'http://127.0.0.1:{self.proxy_port}',
        'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': cert,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
        'NO_GCE_CHECK': 'true',
        'GCS_STAT_CACHE_MAX_AGE': '0', 'GCS_MATCHING_PATHS_CACHE_MAX_AGE': '0',
        'GCS_READ_CACHE_MAX_SIZE_MB': '0',
    }
    self._wait()

  def _wait(self, timeout=30):
    deadline = time.time() + timeout
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2).read()
        return
      except OSError:
        if time.time() > deadline:
          raise RuntimeError('the GCS emulator did not start')
        time.sleep(0.2)

  def close(self):
    self.proxy.shutdown()
    self.emulator.stop()


def main():
  """Serves until stdin closes (or Ctrl-C); the env as one JSON line first."""
  import json
  import tempfile
  with tempfile.TemporaryDirectory() as directory:
    gcs = LocalGCS(directory)
    if sys.argv[1:] == ['--shell']:
      print(''.join(f'export {k}={v}\n' for k, v in gcs.env.items()), flush=True)
    else:
      print(json.dumps(gcs.env), flush=True)
    try:
      sys.stdin.read()
    except KeyboardInterrupt:
      pass
    gcs.close()


if __name__ == '__main__':
  main()
