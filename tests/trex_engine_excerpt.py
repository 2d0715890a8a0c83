"""Real engine-inspector JSON, for the layer-precision tests (tests/test_tensorrt_api.py).

Source: NVIDIA/TensorRT, tools/experimental/trt-engine-explorer (TREx),
tests/inputs/mobilenet.qat.onnx.engine.graph.json at commit
8fe05393fed8488631b6d5b54458c4c3492a17dc: a QAT (Q/DQ) MobileNet built by
trtexec with --profilingVerbosity=detailed. The layers below are copied verbatim
(9 of the file's layers, in file order, with the file's "Bindings"); only the
layers in between were left out. TensorRT 10.x/8.x format: "Format/Datatype"
per tensor, "LayerType" (the kernel family) and "ParameterType" (the network
layer type, what TREx groups layers by).
"""

MOBILENET_QAT_EXCERPT = r'''{"Layers": [{
  "Name": "QuantizeLinear_2",
  "LayerType": "Reformat",
  "Inputs": [
  {
    "Name": "input1",
    "Location": "Device",
    "Dimensions": [1,3,224,224],
    "Format/Datatype": "Row major linear FP32"
  }],
  "Outputs": [
  {
    "Name": "317",
    "Location": "Device",
    "Dimensions": [1,3,224,224],
    "Format/Datatype": "Four wide channel vectorized row major Int8 format"
  }],
  "ParameterType": "Reformat",
  "Origin": "QDQ",
  "TacticValue": "0x0000000000000000"
},{
  "Name": "features.0.0.weight + QuantizeLinear_8 + Conv_12 + PWN(Clip_16)",
  "LayerType": "CaskConvolution",
  "Inputs": [
  {
    "Name": "317",
    "Location": "Device",
    "Dimensions": [1,3,224,224],
    "Format/Datatype": "Four wide channel vectorized row major Int8 format"
  }],
  "Outputs": [
  {
    "Name": "334",
    "Location": "Device",
    "Dimensions": [1,32,112,112],
    "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"
  }],
  "ParameterType": "Convolution",
  "Kernel": [3,3],
  "PaddingMode": "kEXPLICIT_ROUND_DOWN",
  "PrePadding": [1,1],
  "PostPadding": [1,1],
  "Stride": [2,2],
  "Dilation": [1,1],
  "OutMaps": 32,
  "Groups": 1,
  "Weights": {"Type": "Int8", "Count": 864},
  "Bias": {"Type": "Float", "Count": 32},
  "HasSparseWeights": 0,
  "Activation": "CLIPPED_RELU",
  "ParameterSubType": "[0.000000,127.000000]",
  "HasBias": 1,
  "HasReLU": 0,
  "TacticName": "volta_int8x4_icudnn_int8x4_128x32_relu_xregs_medium_c32_nn_v1",
  "TacticValue": "0x10d7116a3fad9b7a"
},{
  "Name": "QuantizeLinear_98",
  "LayerType": "Reformat",
  "Inputs": [
  {
    "Name": "410",
    "Location": "Device",
    "Dimensions": [1,24,56,56],
    "Format/Datatype": "Thirty-two wide channel vectorized row major FP16 format"
  }],
  "Outputs": [
  {
    "Name": "413",
    "Location": "Device",
    "Dimensions": [1,24,56,56],
    "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"
  }],
  "ParameterType": "Reformat",
  "Origin": "QDQ",
  "TacticValue": "0x00000000000003e8"
},{
  "Name": "features.15.conv.2.weight + QuantizeLinear_722 + Conv_726 + Add_728",
  "LayerType": "CaskConvolution",
  "Inputs": [
  {
    "Name": "1031",
    "Location": "Device",
    "Dimensions": [1,960,7,7],
    "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"
  },
  {
    "Name": "994",
    "Location": "Device",
    "Dimensions": [1,160,7,7],
    "Format/Datatype": "Thirty-two wide channel vectorized row major FP32 format"
  }],
  "Outputs": [
  {
    "Name": "1043",
    "Location": "Device",
    "Dimensions": [1,160,7,7],
    "Format/Datatype": "Thirty-two wide channel vectorized row major FP32 format"
  }],
  "ParameterType": "Convolution",
  "Kernel": [1,1],
  "PaddingMode": "kEXPLICIT_ROUND_DOWN",
  "PrePadding": [0,0],
  "PostPadding": [0,0],
  "Stride": [1,1],
  "Dilation": [1,1],
  "OutMaps": 160,
  "Groups": 1,
  "Weights": {"Type": "Int8", "Count": 153600},
  "Bias": {"Type": "Float", "Count": 160},
  "HasSparseWeights": 0,
  "Activation": "NONE",
  "HasBias": 1,
  "HasReLU": 0,
  "TacticName": "volta_fp32_i8816cudnn_int8_256x64_ldg16_relu_singleBuffer_interior_nt_v1",
  "TacticValue": "0xf63314d205413938"
},{
  "Name": "Reformatting CopyNode for Input Tensor 0 to GlobalAveragePool_843",
  "LayerType": "Reformat",
  "Inputs": [
  {
    "Name": "1157",
    "Location": "Device",
    "Dimensions": [1,1280,7,7],
    "Format/Datatype": "Thirty-two wide channel vectorized row major FP16 format"
  }],
  "Outputs": [
  {
    "Name": "Reformatted Input Tensor 0 to GlobalAveragePool_843",
    "Location": "Device",
    "Dimensions": [1,1280,7,7],
    "Format/Datatype": "Two wide channel vectorized row major FP16 format"
  }],
  "ParameterType": "Reformat",
  "Origin": "REFORMAT",
  "TacticValue": "0x00000000000003e8"
},{
  "Name": "GlobalAveragePool_843",
  "LayerType": "TiledPooling",
  "Inputs": [
  {
    "Name": "Reformatted Input Tensor 0 to GlobalAveragePool_843",
    "Location": "Device",
    "Dimensions": [1,1280,7,7],
    "Format/Datatype": "Two wide channel vectorized row major FP16 format"
  }],
  "Outputs": [
  {
    "Name": "1158",
    "Location": "Device",
    "Dimensions": [1,1280,1,1],
    "Format/Datatype": "Two wide channel vectorized row major FP16 format"
  }],
  "ParameterType": "Pooling",
  "PoolingType": "AVERAGE",
  "WindowSize": [7,7],
  "PaddingMode": "kEXPLICIT_ROUND_DOWN",
  "PrePadding": [0,0],
  "PostPadding": [0,0],
  "Stride": [1,1],
  "BlendFactor": 0,
  "AverageCountExcludesPadding": 1,
  "TacticValue": "0x00000000007f0101"
},{
  "Name": "QuantizeLinear_854",
  "LayerType": "Reformat",
  "Inputs": [
  {
    "Name": "1158",
    "Location": "Device",
    "Dimensions": [1,1280,1,1],
    "Format/Datatype": "Two wide channel vectorized row major FP16 format"
  }],
  "Outputs": [
  {
    "Name": "1166",
    "Location": "Device",
    "Dimensions": [1,1280,1,1],
    "Format/Datatype": "Four wide channel vectorized row major Int8 format"
  }],
  "ParameterType": "Reformat",
  "Origin": "QDQ",
  "TacticValue": "0x00000000000003e8"
},{
  "Name": "classifier.1.weight + QuantizeLinear_860 + Gemm_864 + classifier.1.bias + (Unnamed Layer* 849) [Shuffle] + unsqueeze_node_after_classifier.1.bias + (Unnamed Layer* 849) [Shuffle]_(Unnamed Layer* 849) [Shuffle]_output + (Unnamed Layer* 850) [ElementWise]",
  "LayerType": "CaskConvolution",
  "Inputs": [
  {
    "Name": "1166",
    "Location": "Device",
    "Dimensions": [1,1280,1,1],
    "Format/Datatype": "Four wide channel vectorized row major Int8 format"
  }],
  "Outputs": [
  {
    "Name": "(Unnamed Layer* 850) [ElementWise]_out_tensor",
    "Location": "Device",
    "Dimensions": [1,1000,1,1],
    "Format/Datatype": "Row major linear FP32"
  }],
  "ParameterType": "Convolution",
  "Kernel": [1,1],
  "PaddingMode": "kEXPLICIT_ROUND_DOWN",
  "PrePadding": [0,0],
  "PostPadding": [0,0],
  "Stride": [1,1],
  "Dilation": [1,1],
  "OutMaps": 1000,
  "Groups": 1,
  "Weights": {"Type": "Int8", "Count": 1280000},
  "Bias": {"Type": "Float", "Count": 1000},
  "HasSparseWeights": 0,
  "Activation": "NONE",
  "HasBias": 1,
  "HasReLU": 0,
  "TacticName": "sm70_xmma_fprop_conv1x1_i8f32_f32_f32_nchw_vect_c_4kcrs_vect_c_4_nchw_simt_small_batch_bias_relu",
  "TacticValue": "0xc073b0053ce90eac"
},{
  "Name": "copied_squeeze_after_(Unnamed Layer* 850) [ElementWise]",
  "LayerType": "NoOp",
  "Inputs": [
  {
    "Name": "(Unnamed Layer* 850) [ElementWise]_out_tensor",
    "Location": "Device",
    "Dimensions": [1,1000,1,1],
    "Format/Datatype": "Row major linear FP32"
  }],
  "Outputs": [
  {
    "Name": "1179",
    "Location": "Device",
    "Dimensions": [1,1000],
    "Format/Datatype": "Row major linear FP32"
  }],
  "TacticValue": "0x0000000000000000"
}],
"Bindings": ["input1"
,"1179"
]}
'''
