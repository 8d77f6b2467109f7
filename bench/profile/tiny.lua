local header = '{"inputs":[{"name":"x","datatype":"FP32","shape":[1,16],"parameters":{"binary_data_size":64}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}'
wrk.method = "POST"
wrk.body = header .. string.rep("\0\0\128\63", 16)
wrk.headers["Inference-Header-Content-Length"] = tostring(#header)
wrk.headers["Content-Type"] = "application/octet-stream"
