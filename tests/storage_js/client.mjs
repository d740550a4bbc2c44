// Drives @supabase/storage-js as the web app does. One JSON step in argv[2], one JSON line out.
// Env: SUPABASE_URL, ACCESS_TOKEN (the signed-in user's), SERVICE_KEY (for steps a server takes).
// Steps:
//   {"op": "upload", "url": upload_url | null, "bucket", "path", "token", "file": {...}, "options"}
//      uploadToSignedUrl; bucket and path come from the API's upload_url as the web app reads them
//   {"op": "sign", "bucket", "path", "expiresIn", "download"?}
//      createSignedUrl with the service key, then fetches the URL it gave
// A file is {"as": "blob" | "file" | "arraybuffer" | "uint8array", "b64" | "zeros", "type"?, "name"?}.
import { StorageApiError, StorageClient, StorageUnknownError } from '@supabase/storage-js'

const { SUPABASE_URL, ACCESS_TOKEN, SERVICE_KEY } = process.env
const STORAGE_URL = `${SUPABASE_URL}/storage/v1`

function client(key) {
  return new StorageClient(STORAGE_URL, { apikey: key, Authorization: `Bearer ${key}` })
}

// The API hands out the signed URL; storage-js wants the bucket and the object path inside it.
function signedTarget(uploadUrl) {
  const prefix = new URL(`${STORAGE_URL}/object/upload/sign/`).pathname
  const url = new URL(uploadUrl)
  const [bucket, ...path] = url.pathname.slice(prefix.length).split('/').map(decodeURIComponent)
  return { bucket, path: path.join('/'), token: url.searchParams.get('token') }
}

function body(file) {
  const bytes = file.b64 === undefined ? Buffer.alloc(file.zeros) : Buffer.from(file.b64, 'base64')
  const view = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  switch (file.as) {
    case 'blob':
      return new Blob([view], file.type ? { type: file.type } : {})
    case 'file':
      return new File([view], file.name, file.type ? { type: file.type } : {})
    case 'arraybuffer':
      return view.slice().buffer
    default:
      return view
  }
}

function describe(error) {
  if (!error) return null
  return {
    name: error.name,
    message: error.message,
    status: error.status ?? null,
    statusCode: error.statusCode ?? null,
    code: error.code ?? null,
    api: error instanceof StorageApiError,
    unknown: error instanceof StorageUnknownError,
  }
}

async function upload(step) {
  const target = step.url ? signedTarget(step.url) : step
  const bucket = client(ACCESS_TOKEN).from(target.bucket)
  const { data, error } = await bucket.uploadToSignedUrl(target.path, target.token, body(step.file), step.options)
  return { target, data, error: describe(error) }
}

async function sign(step) {
  const options = step.download === undefined ? undefined : { download: step.download }
  const bucket = client(SERVICE_KEY).from(step.bucket)
  const { data, error } = await bucket.createSignedUrl(step.path, step.expiresIn, options)
  if (error) return { error: describe(error) }
  const resp = await fetch(data.signedUrl)
  const bytes = Buffer.from(await resp.arrayBuffer())
  return {
    signedUrl: data.signedUrl,
    status: resp.status,
    contentType: resp.headers.get('content-type'),
    disposition: resp.headers.get('content-disposition'),
    b64: bytes.toString('base64'),
  }
}

const step = JSON.parse(process.argv[2])
const result = await { upload, sign }[step.op](step)
process.stdout.write(JSON.stringify(result) + '\n')
