// Drives tus-js-client as the web app does for a resumable signed upload. One JSON step in argv[2], one JSON line out.
// A step: {"endpoint", "token", "bucket", "path", "file" (a local path), "contentType", "chunkSize",
//          "uploadUrl"? (resume this upload instead of creating one), "stopAfter"? (abort once the server has
//          accepted at least this many bytes), "retryDelays"? (default none: errors come back at once)}
// Out: {"url", "accepted", "done", "patchOffsets" (Upload-Offset of each PATCH sent), "error": null | {...}}
import { readFileSync } from 'node:fs'
import * as tus from 'tus-js-client'

function describe(error) {
  const response = error.originalResponse
  return {
    message: error.message,
    status: response ? response.getStatus() : null,
    body: response ? response.getBody() : null,
    method: error.originalRequest ? error.originalRequest.getMethod() : null,
  }
}

function run(step) {
  const data = readFileSync(step.file)
  const patchOffsets = []
  return new Promise((resolve) => {
    let accepted = 0
    const upload = new tus.Upload(data, {
      endpoint: step.endpoint,
      uploadUrl: step.uploadUrl ?? null,
      retryDelays: step.retryDelays ?? null,
      headers: { 'x-signature': step.token },
      uploadDataDuringCreation: true,
      removeFingerprintOnSuccess: true,
      metadata: {
        bucketName: step.bucket,
        objectName: step.path,
        contentType: step.contentType,
        cacheControl: '3600',
      },
      chunkSize: step.chunkSize,
      onBeforeRequest(req) {
        if (req.getMethod() === 'PATCH') patchOffsets.push(Number(req.getHeader('Upload-Offset')))
      },
      onChunkComplete(_size, bytesAccepted) {
        accepted = bytesAccepted
        if (step.stopAfter != null && bytesAccepted >= step.stopAfter && bytesAccepted < data.length) {
          upload.abort().then(() => resolve({ url: upload.url, accepted, done: false, patchOffsets, error: null }))
        }
      },
      onSuccess() {
        resolve({ url: upload.url, accepted: data.length, done: true, patchOffsets, error: null })
      },
      onError(error) {
        resolve({ url: upload.url, accepted, done: false, patchOffsets, error: describe(error) })
      },
    })
    upload.start()
  })
}

const result = await run(JSON.parse(process.argv[2]))
process.stdout.write(JSON.stringify(result) + '\n')
